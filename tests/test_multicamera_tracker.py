"""The vectorised multi-camera tracker against ultralytics' own ByteTrack and BoT-SORT, frame for frame.

vigild runs ByteTrack for all cameras of a batch in one step (plugins/tracking/multicamera_tracker.py); these tests
hold it to ultralytics' trackers, one per camera, on the same detections: every detection must get a track from
both or from neither, and ultralytics' ids must map one-to-one onto vigild's on each camera.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest
from ultralytics_view import UltralyticsView

from vigild.config.loading import CameraConfig
from vigild.events import add_track_events
from vigild.frame import Detections, Frame
from vigild.plugin import FrameErrors, PluginContext
from vigild.plugins.tracking.box_kalman import BoxKalman
from vigild.plugins.tracking.bytetrack import ByteTrack, ByteTrackConfig
from vigild.plugins.tracking.multicamera_tracker import AssociationSettings, CameraFrame, MultiCameraTracker

VTEST = Path(__file__).resolve().parents[1].parent / "shared" / "media" / "vtest.avi"


def crowd(objects: int, frames: int, seed: int, *, pan: np.ndarray | None = None) -> list[Detections]:
    """Boxes moving at constant speed with noise, in shuffled order, some missed on each frame (a run of misses
    makes tracks lost and found again or ended), confidences spread over both matching stages, a few degenerate."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(0, 900, (objects, 2)).astype(np.float32)
    velocity = rng.uniform(-6, 6, (objects, 2)).astype(np.float32)
    size = rng.uniform(15, 140, (objects, 2)).astype(np.float32)
    hidden_from = rng.integers(0, frames, objects)
    hidden_for = rng.integers(0, 25, objects)
    out = []
    for i in range(frames):
        corner = start + velocity * i + rng.normal(0, 2.0, (objects, 2)).astype(np.float32)
        if pan is not None:
            corner -= pan[i]
        xyxy = np.concatenate([corner, corner + size * rng.uniform(0.9, 1.1, (objects, 1)).astype(np.float32)], 1)
        degenerate = rng.random(objects) < 0.02
        xyxy[degenerate, 2] = xyxy[degenerate, 0]  # zero width: neither tracker may use it
        confidence = rng.uniform(0.05, 1.0, objects).astype(np.float32)
        seen = (rng.random(objects) > 0.1) & ~((i >= hidden_from) & (i < hidden_from + hidden_for))
        order = rng.permutation(np.flatnonzero(seen))
        out.append(
            Detections.untracked(
                xyxy[order],
                confidence[order],
                rng.integers(0, 3, len(order)).astype(np.int32),
                ("person", "car", "dog"),
            )
        )
    return out


def ultralytics_tracker(form: str, settings: AssociationSettings, gmc: str | None = None):
    from ultralytics.trackers.bot_sort import BOTSORT
    from ultralytics.trackers.byte_tracker import BYTETracker

    args = Namespace(
        track_high_thresh=settings.high_thresh,
        track_low_thresh=settings.low_thresh,
        new_track_thresh=settings.new_track_thresh,
        track_buffer=settings.max_frames_lost,
        match_thresh=settings.match_thresh,
        fuse_score=settings.fuse_score,
        gmc_method=gmc,
        proximity_thresh=0.5,
        appearance_thresh=0.8,
        with_reid=False,
        model="auto",
    )
    return BYTETracker(args) if form == "xyah" else BOTSORT(args)


class IdMap:
    """Checks that ultralytics' ids and vigild's correspond one to one on a camera."""

    def __init__(self) -> None:
        self.forward: dict[int, int] = {}
        self.backward: dict[int, int] = {}

    def check(self, theirs: np.ndarray, ours: np.ndarray, where: str) -> None:
        np.testing.assert_array_equal(theirs >= 0, ours >= 0, err_msg=f"{where}: tracked detections differ")
        for a, b in zip(theirs[theirs >= 0].tolist(), ours[ours >= 0].tolist(), strict=True):
            assert self.forward.setdefault(a, b) == b, f"{where}: ultralytics' track {a} became two tracks"
            assert self.backward.setdefault(b, a) == a, f"{where}: vigild's track {b} is two ultralytics tracks"


def their_ids(tracker, detections: Detections, image: np.ndarray | None = None) -> np.ndarray:
    out = tracker.update(UltralyticsView(detections), image)
    ids = np.full(len(detections), -1, np.int64)
    if len(out):
        ids[out[:, 7].astype(np.int64)] = out[:, 4].astype(np.int64)
    return ids


SETTINGS = [
    pytest.param("xyah", AssociationSettings(0.5, 0.1, 0.6, 0.8, 10, True), id="bytetrack-defaults-ish"),
    pytest.param("xyah", AssociationSettings(0.25, 0.1, 0.25, 0.8, 30, True), id="bytetrack-ultralytics-defaults"),
    pytest.param("xyah", AssociationSettings(0.6, 0.2, 0.7, 0.6, 3, False), id="bytetrack-no-fuse-short-buffer"),
    pytest.param("xywh", AssociationSettings(0.5, 0.1, 0.6, 0.8, 10, True), id="botsort"),
    pytest.param("xywh", AssociationSettings(0.3, 0.05, 0.4, 0.9, 5, False), id="botsort-no-fuse"),
]


@pytest.mark.parametrize(("form", "settings"), SETTINGS)
def test_same_tracks_as_ultralytics_for_every_camera_of_a_batch(form, settings):
    cameras, frames = 6, 160
    scenes = [crowd(5 + 7 * c, frames, seed=c) for c in range(cameras)]
    theirs = [ultralytics_tracker(form, settings) for _ in range(cameras)]
    ours = MultiCameraTracker(settings, form)
    maps = [IdMap() for _ in range(cameras)]
    rng = np.random.default_rng(99)
    steps = [0] * cameras  # cameras miss batches now and then: their own frame counts go on separately
    tracked = 0
    for _ in range(frames):
        present = [c for c in range(cameras) if rng.random() > 0.2 and steps[c] < frames]
        results = ours.step([CameraFrame(f"cam{c}", scenes[c][steps[c]], 0.1 * steps[c], steps[c]) for c in present])
        for c, result in zip(present, results, strict=True):
            want = their_ids(theirs[c], scenes[c][steps[c]])
            maps[c].check(want, result.tracker_id, f"camera {c} frame {steps[c]}")
            tracked += int((want >= 0).sum())
            steps[c] += 1
    assert tracked > 1000
    assert all(len(m.forward) > 5 for m in maps)


def test_camera_motion_compensation_matches_ultralytics_botsort():
    """A camera panning over the plaza (a moving crop of vtest.avi): BoT-SORT's sparse optical flow moves the
    tracks before matching, in vigild as in ultralytics."""
    capture = cv2.VideoCapture(str(VTEST))
    images = []
    while len(images) < 60:
        ok, image = capture.read()
        assert ok
        images.append(image)
    pan = np.stack([np.array([2.0 * i, 1.0 * i], np.float32) for i in range(60)])
    views = [np.ascontiguousarray(img[int(p[1]) : int(p[1]) + 440, int(p[0]) : int(p[0]) + 600]) for img, p in
             zip(images, pan, strict=True)]  # fmt: skip
    detections = crowd(12, 60, seed=5, pan=pan)
    settings = AssociationSettings(0.5, 0.1, 0.6, 0.8, 10, True)
    theirs = ultralytics_tracker("xywh", settings, gmc="sparseOptFlow")
    ours = MultiCameraTracker(settings, "xywh", gmc_method="sparseOptFlow")
    ids = IdMap()
    for i in range(60):
        (result,) = ours.step([CameraFrame("pan", detections[i], 0.1 * i, i, views[i])])
        ids.check(their_ids(theirs, detections[i], views[i]), result.tracker_id, f"frame {i}")
    assert len(ids.forward) >= 8


@pytest.mark.parametrize("form", ["xyah", "xywh"])
def test_kalman_filter_is_ultralytics_filter_on_arrays(form):
    from ultralytics.trackers.utils.kalman_filter import KalmanFilterXYAH, KalmanFilterXYWH

    single = KalmanFilterXYAH() if form == "xyah" else KalmanFilterXYWH()
    batched = BoxKalman(form)
    rng = np.random.default_rng(1)
    measurements = np.column_stack([rng.uniform(0, 900, (20, 2)), rng.uniform(0.3, 2, 20), rng.uniform(20, 200, 20)])
    if form == "xywh":
        measurements[:, 2] *= measurements[:, 3]
    mean, cov = batched.initiate(measurements)
    for _ in range(3):
        mean, cov = batched.predict(mean, cov)
        mean, cov = batched.update(mean, cov, measurements + rng.normal(0, 2, measurements.shape))
    for m, start in zip(mean[:3], measurements[:3], strict=False):
        assert np.isfinite(m).all() and np.all(np.abs(m[:2] - start[:2]) < 20)
    # One step from the same state, side by side.
    rng = np.random.default_rng(2)
    measured = measurements + rng.normal(0, 2, measurements.shape)
    predicted_mean, predicted_cov = batched.predict(mean, cov)
    updated_mean, updated_cov = batched.update(predicted_mean, predicted_cov, measured)
    for i in range(len(mean)):
        m, c = single.predict(mean[i].copy(), cov[i].copy())
        np.testing.assert_allclose(predicted_mean[i], m, rtol=1e-12)
        np.testing.assert_allclose(predicted_cov[i], c, rtol=1e-12, atol=1e-12)
        m, c = single.update(m, c, measured[i])
        np.testing.assert_allclose(updated_mean[i], m, rtol=1e-9)
        np.testing.assert_allclose(updated_cov[i], c, rtol=1e-7, atol=1e-9)
        _, c0 = single.initiate(measurements[i])
        np.testing.assert_allclose(batched.initiate(measurements[i : i + 1])[1][0], c0, rtol=1e-12)


def test_a_step_that_fails_leaves_the_tracks_as_they_were():
    settings = AssociationSettings(0.5, 0.1, 0.6, 0.8, 10, True)
    tracker = MultiCameraTracker(settings)
    scene = crowd(10, 5, seed=3)
    for i in range(3):
        tracker.step([CameraFrame("a", scene[i], i, i), CameraFrame("b", scene[i], i, i)])
    before = {name: getattr(tracker.tracks, name).copy() for name in ("uid", "mean", "state", "frame_id")}
    with pytest.raises(ValueError, match="one frame per camera"):
        tracker.step([CameraFrame("a", scene[3], 3, 3), CameraFrame("a", scene[4], 4, 4)])
    for name, value in before.items():
        np.testing.assert_array_equal(getattr(tracker.tracks, name), value, err_msg=name)


def plugin(**overrides) -> ByteTrack:
    context = PluginContext("cpu", {name: CameraConfig(source=name) for name in ("a", "b")})
    tracker = ByteTrack(ByteTrackConfig(update_interval=0, **overrides), context)
    tracker.start()
    return tracker


def frame(camera: str, index: int, detections: Detections) -> Frame:
    return Frame(camera, index, 100.0 + index / 10, float(index), np.zeros((4, 4, 3), np.uint8), detections=detections)


def test_two_frames_of_one_camera_in_a_batch_are_tracked_in_order():
    scene = crowd(8, 12, seed=4)
    one_by_one, together = plugin(), plugin()
    alone = [frame("a", i, scene[i]) for i in range(12)]
    for f in alone:
        one_by_one.process([f])
        add_track_events(f)
    paired = [frame("a", i, scene[i]) for i in range(12)]
    for i in range(0, 12, 2):
        together.process([paired[i], frame("b", i, scene[i]), paired[i + 1]])
        for f in paired[i : i + 2]:
            add_track_events(f)
    for x, y in zip(alone, paired, strict=True):
        np.testing.assert_array_equal(x.detections.tracker_id, y.detections.tracker_id)
        assert [e.type for e in x.events] == [e.type for e in y.events]
    assert sum(e.type == "track.new" for f in alone for e in f.events) >= 5


def test_a_frame_with_broken_detections_is_named_and_the_others_tracked():
    scene = crowd(8, 4, seed=6)
    tracker, reference = plugin(), plugin()
    for i in range(3):
        tracker.process([frame("a", i, scene[i]), frame("b", i, scene[i])])
        reference.process([frame("a", i, scene[i]), frame("b", i, scene[i])])
    broken = scene[3].xyxy.copy()
    broken[0, 0] = np.nan
    bad = frame("b", 3, Detections.untracked(broken, scene[3].confidence, scene[3].class_id, scene[3].class_names))
    good = frame("a", 3, scene[3])
    with pytest.raises(FrameErrors) as raised:
        tracker.process([good, bad])
    assert list(raised.value.errors) == [1]
    # Camera a is tracked as if nothing had happened; camera b goes on as if its broken frame had not come.
    expected = [frame("a", 3, scene[3]), frame("b", 3, scene[3])]
    reference.process(expected)
    np.testing.assert_array_equal(good.detections.tracker_id, expected[0].detections.tracker_id)
    again = frame("b", 3, scene[3])
    tracker.process([again])
    np.testing.assert_array_equal(again.detections.tracker_id, expected[1].detections.tracker_id)
    assert (again.detections.tracker_id >= 1).any()


def tracker_state(tracker: MultiCameraTracker) -> dict[str, object]:
    """Everything a step may change: every column of the track table, the cameras and their counters."""
    columns = {name: getattr(tracker.tracks, name) for name in type(tracker.tracks).COLUMNS}
    state: dict[str, object] = {  # of object columns (class names, masks, keypoints): which objects
        name: [id(v) for v in column] if column.dtype == object else column.copy() for name, column in columns.items()
    }
    state |= {"slots": dict(tracker._slots), "frames": tracker._frames.copy(),
              "next_uid": tracker._next_uid.copy(), "order": tracker._order}  # fmt: skip
    return state


def assert_same_state(actual: dict[str, object], expected: dict[str, object]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(actual[name], value, err_msg=name)
        else:
            assert actual[name] == value, name


def fail_on_last_lapjv(monkeypatch, tracker: MultiCameraTracker, frames: list[CameraFrame]) -> None:
    """lap.lapjv raises on its last call of the step on `frames` (the last camera's last stage): counted on a copy."""
    import copy

    import lap

    real, calls = lap.lapjv, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lap, "lapjv", counting)
    copy.deepcopy(tracker).step(frames)
    last = len(calls)
    assert last >= 4, "the step must do real work before the failure"
    calls.clear()

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == last:
            raise RuntimeError("injected failure in lap.lapjv")
        return real(*args, **kwargs)

    monkeypatch.setattr(lap, "lapjv", failing)


def fail_in_kalman_update(monkeypatch, tracker: MultiCameraTracker, frames: list[CameraFrame]) -> None:
    """The Kalman update of the matched tracks raises: every association stage of every camera is done."""

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure in the Kalman update")

    monkeypatch.setattr(tracker.kalman, "update", failing)


def fail_in_reporting_ended_tracks(monkeypatch, tracker: MultiCameraTracker, frames: list[CameraFrame]) -> None:
    """The last thing a step does, after its new tracks have ids: making the ended-track reports."""

    def failing(gone):
        raise RuntimeError("injected failure in the ended-track report")

    monkeypatch.setattr(MultiCameraTracker, "_ended", staticmethod(failing))


@pytest.mark.parametrize("inject", [fail_on_last_lapjv, fail_in_kalman_update, fail_in_reporting_ended_tracks])
def test_a_step_that_fails_after_its_work_leaves_the_tracker_as_it_was(monkeypatch, inject):
    """A failure late in a step (the last camera's assignment, the Kalman update, the reports) leaves every part of
    the tracker as before the step, also for a camera first seen in it; afterwards the tracker goes on exactly as a
    tracker that never got the failed step."""
    settings = AssociationSettings(0.5, 0.1, 0.6, 0.8, 10, True)
    tracker, reference = MultiCameraTracker(settings), MultiCameraTracker(settings)
    scene = crowd(12, 12, seed=3)
    for i in range(4):
        for t in (tracker, reference):
            t.step([CameraFrame("a", scene[i], i, i), CameraFrame("b", scene[i + 1], i, i)])
    before = tracker_state(tracker)
    failing = [CameraFrame("a", scene[4], 4, 4), CameraFrame("b", scene[5], 4, 4), CameraFrame("c", scene[0], 4, 4)]
    with monkeypatch.context() as patch:
        inject(patch, tracker, failing)
        with pytest.raises(RuntimeError, match="injected failure"):
            tracker.step(failing)
    assert_same_state(tracker_state(tracker), before)
    for i in range(5, 11):
        frames = [
            CameraFrame("a", scene[i], i, i),
            CameraFrame("c", scene[i - 5], i, i),
            CameraFrame("b", scene[i], i, i),
        ]
        ours, theirs = tracker.step(frames), reference.step(frames)
        for x, y in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(x.tracker_id, y.tracker_id)
            np.testing.assert_array_equal(x.new, y.new)
            np.testing.assert_array_equal(x.ended.tracker_id, y.ended.tracker_id)
    assert_same_state(tracker_state(tracker), tracker_state(reference))
    assert (tracker.tracks.uid > 0).sum() >= 10


def vtest_frames(count: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(VTEST))
    images = []
    while len(images) < count:
        ok, image = capture.read()
        assert ok
        images.append(image)
    return images


SHAKE = (60, 20)  # pixels: a handheld camera jumping between two views of the plaza, frame by frame


def shaking_camera(frames: int) -> tuple[list[np.ndarray], list[Detections], np.ndarray]:
    """Views of vtest.avi from a camera that jumps by SHAKE every frame, and eight still objects seen through it:
    (views, detections with the objects in a fixed order, the objects' boxes in the plaza)."""
    width, height, left = 520, 400, 100
    world = np.array([[260 + 90 * (k % 4), 200 + 110 * (k // 4), 300 + 90 * (k % 4), 280 + 110 * (k // 4)]
                      for k in range(8)], np.float32)  # fmt: skip
    views, detections = [], []
    for i, image in enumerate(vtest_frames(frames)):
        dx, dy = SHAKE if i % 2 else (0, 0)
        views.append(np.ascontiguousarray(image[dy : dy + height, left + dx : left + dx + width]))
        boxes = world - np.array([left + dx, dy, left + dx, dy], np.float32)
        detections.append(Detections.untracked(boxes, np.full(8, 0.9, np.float32), np.zeros(8, np.int32), ("person",)))
    return views, detections, world


def botsort_plugin(**overrides):
    from vigild.plugins.tracking.botsort import BotSort, BotSortConfig

    tracker = BotSort(
        BotSortConfig(update_interval=0, **overrides), PluginContext("cpu", {"p": CameraConfig(source="p")})
    )
    tracker.start()
    return tracker


def test_botsort_gmc_method_from_the_config_keeps_ids_through_camera_shake():
    """`gmc_method: sparseOptFlow` in the BoT-SORT plugin's config: eight still objects seen by a camera that jumps
    60 px right and 20 px down and back every frame each keep one id from the first frame to the last, as
    ultralytics' BOTSORT with the same method tracks them; without it the jumps break the tracks."""
    views, detections, world = shaking_camera(30)

    def ids_per_object(gmc_method: str) -> list[set[int]]:
        tracker = botsort_plugin(gmc_method=gmc_method)
        seen: list[set[int]] = [set() for _ in world]
        for i, (view, found) in enumerate(zip(views, detections, strict=True)):
            frame = Frame("p", i, 100.0 + i / 10, float(i), view, detections=found)
            tracker.process([frame])
            for k, track in enumerate(frame.detections.tracker_id.tolist()):
                seen[k].add(track)
        return seen

    compensated = ids_per_object("sparseOptFlow")
    assert all(len(ids) == 1 and -1 not in ids for ids in compensated), compensated
    assert len(set.union(*compensated)) == len(world)
    fixed = ids_per_object("none")
    assert any(len(ids) > 1 for ids in fixed), "without compensation the jumps must break tracks (else no test)"

    theirs = ultralytics_tracker("xywh", AssociationSettings(0.25, 0.1, 0.25, 0.8, 30, True), gmc="sparseOptFlow")
    tracker, ids = botsort_plugin(gmc_method="sparseOptFlow"), IdMap()
    for i, (view, found) in enumerate(zip(views, detections, strict=True)):
        frame = Frame("p", i, 100.0 + i / 10, float(i), view, detections=found)
        tracker.process([frame])
        ids.check(their_ids(theirs, found, view), frame.detections.tracker_id, f"frame {i}")


def test_a_failed_step_leaves_the_camera_motion_compensation_as_it_was(monkeypatch):
    """A BoT-SORT step that fails after the camera's motion was estimated: the next frame is compensated from the
    last frame that was tracked, exactly as by a tracker that never got the failed frame."""
    views, detections, _ = shaking_camera(12)
    tracker, reference = botsort_plugin(gmc_method="sparseOptFlow"), botsort_plugin(gmc_method="sparseOptFlow")

    def frame_(i: int) -> Frame:
        return Frame("p", i, 100.0 + i / 10, float(i), views[i], detections=detections[i])

    for i in range(6):
        tracker.process([frame_(i)])
        reference.process([frame_(i)])
    with monkeypatch.context() as patch:
        fail_in_kalman_update(patch, tracker._tracker, [])
        with pytest.raises(FrameErrors, match="injected failure"):
            tracker.process([frame_(6)])
    for i in range(7, 12):
        ours, theirs = frame_(i), frame_(i)
        tracker.process([ours])
        reference.process([theirs])
        np.testing.assert_array_equal(ours.detections.tracker_id, theirs.detections.tracker_id)
        np.testing.assert_array_equal(tracker._tracker.tracks.mean, reference._tracker.tracks.mean, err_msg=f"{i}")


def test_camera_motion_compensation_restarts_when_the_frame_size_changes(caplog):
    """The camera's frame size changes mid-stream (its resolution was changed): BoT-SORT's compensation, which
    cannot compare frames of two sizes, says so and starts again from the new frames, and the still objects keep
    their ids through the shake that follows."""
    views, detections, world = shaking_camera(24)
    smaller = 40  # pixels cut off the right and the bottom from frame 11 on: no object is near there
    source = [*range(11), 10, *range(12, 24)]  # the camera holds still while it changes (frame 11 is as frame 10)
    tracker = botsort_plugin(gmc_method="sparseOptFlow")
    seen: list[set[int]] = [set() for _ in world]
    for i, s in enumerate(source):
        view = views[s] if i <= 10 else np.ascontiguousarray(views[s][:-smaller, :-smaller])
        frame = Frame("p", i, 100.0 + i / 10, float(i), view, detections=detections[s])
        tracker.process([frame])
        for k, track in enumerate(frame.detections.tracker_id.tolist()):
            seen[k].add(track)
    assert all(len(ids) == 1 and -1 not in ids for ids in seen), seen
    assert any("camera-motion compensation failed on camera p frame 11" in r.getMessage() for r in caplog.records)
