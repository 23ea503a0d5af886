"""The vectorised multi-camera tracker against ultralytics' own ByteTrack and BoT-SORT, frame for frame.

vigild runs ByteTrack for all cameras of a batch in one step (plugins/backends/multicamera_tracker.py); these tests
hold it to ultralytics' trackers, one per camera, on the same detections: every detection must get a track from
both or from neither, and ultralytics' ids must map one-to-one onto vigild's on each camera.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest

from vigild.config import CameraConfig
from vigild.frame import Detections, Frame
from vigild.plugin import FrameErrors, PluginContext
from vigild.plugins.backends.box_kalman import BoxKalman
from vigild.plugins.backends.multicamera_tracker import (
    AssociationSettings,
    CameraFrame,
    MultiCameraTracker,
    UltralyticsView,
)
from vigild.plugins.bytetrack import ByteTrack, ByteTrackConfig

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
    paired = [frame("a", i, scene[i]) for i in range(12)]
    for i in range(0, 12, 2):
        together.process([paired[i], frame("b", i, scene[i]), paired[i + 1]])
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
