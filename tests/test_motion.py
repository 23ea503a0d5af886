"""Motion gating (issue 34, docs/motion.md): motion on a small grey copy, the detector only where and when something
moved, crops around it, and the tracker's clock in processed frames.

Ground truth: synthetic frames whose moving square the test draws; and the real plaza footage made quiet
(tests/motion_scenes.py), where what the same detector and tracker find on every frame (ungated) is what gating
must keep."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import ROOT, daemon_env, yolo_fastest_yaml
from motion_scenes import (
    distant_scene,
    footage,
    frozen_scene,
    lights_scene,
    matched,
    quiet_scene,
    through_chain,
    to_distant,
    write_h264,
)
from service import Service, service_config
from streams import free_port

from vigild.client import ControlClient
from vigild.config.loading import ConfigError, load_config
from vigild.config.motion import MotionConfig, MotionMask
from vigild.config.settings import CameraConfig
from vigild.events import add_track_events
from vigild.frame import Detections, Frame
from vigild.plugin import PluginContext
from vigild.plugins.tracking.bytetrack import ByteTrack, ByteTrackConfig
from vigild.vision.motion import MotionDetector
from vigild.vision.regions import join_crops, plan_crops

CHAIN = yolo_fastest_yaml() + "\n  - type: bytetrack\n    frame_rate: 5"


def grey_frame(square: tuple[int, int] | None = None, level: int = 90, size: tuple[int, int] = (640, 360)) -> np.ndarray:
    """A flat frame with a textured floor; a 40x40 bright square with its top-left corner at `square`."""
    width, height = size
    frame = np.full((height, width, 3), level, np.uint8)
    frame[::16, :] = level + 20  # lines, so a global change is a change of a picture and not of a flat colour
    if square is not None:
        x, y = square
        frame[y : y + 40, x : x + 40] = 230
    return frame


def test_motion_is_found_where_the_square_moved_and_not_in_a_mask_nor_in_noise():
    detector = MotionDetector(MotionConfig())
    first = detector(grey_frame((100, 100)))
    assert first.fraction == 0 and len(first.boxes) == 0  # the first frame is the background
    moved = detector(grey_frame((300, 200)))
    assert len(moved.boxes) >= 1
    x0, y0 = moved.boxes[:, :2].min(axis=0)
    x1, y1 = moved.boxes[:, 2:].max(axis=0)
    # where it was and where it is now, within the small copy's resolution (4 frame pixels a cell) and the dilation
    assert 80 <= x0 <= 100 and 80 <= y0 <= 100 and 340 <= x1 <= 360 and 240 <= y1 <= 260
    assert 0 < moved.fraction < 0.05
    # the same move with the new place masked: only the old place counts
    masked = MotionDetector(MotionConfig(masks=[MotionMask(points=[(280, 180), (360, 180), (360, 260), (280, 260)])]))
    masked(grey_frame((100, 100)))
    seen = masked(grey_frame((300, 200)))
    assert len(seen.boxes) >= 1 and seen.boxes[:, 2].max() < 160
    # a blip of 2x2 frame pixels is below min_area (8x8)
    quiet = MotionDetector(MotionConfig())
    quiet(grey_frame())
    blip = grey_frame()
    blip[50:52, 50:52] = 255
    assert len(quiet(blip).boxes) == 0


def test_a_light_switched_on_is_a_global_change_and_the_next_frame_is_quiet():
    detector = MotionDetector(MotionConfig())
    detector(grey_frame(level=60))
    switched = detector(grey_frame(level=160))
    assert switched.global_change and len(switched.boxes) == 0
    after = detector(grey_frame(level=160))
    assert not after.global_change and len(after.boxes) == 0
    walker = detector(grey_frame((200, 100), level=160))
    assert len(walker.boxes) >= 1


def test_crops_have_the_models_size_cover_the_regions_and_give_way_to_the_whole_frame():
    regions = np.array([[10, 10, 30, 50], [600, 300, 620, 340]], np.float32)
    crops = plan_crops(regions, (1280, 720), (320, 320), 0.6)
    assert crops is not None and len(crops) == 2
    for crop, region in zip(crops, regions, strict=True):
        assert crop[2] - crop[0] == 320 and crop[3] - crop[1] == 320
        assert (crop[:2] <= region[:2]).all() and (crop[2:] >= region[2:]).all()
        assert (crop >= 0).all() and crop[2] <= 1280 and crop[3] <= 720
    # two regions close together: one crop; regions over most of the frame: the whole frame
    close = plan_crops(np.array([[10, 10, 30, 50], [60, 20, 90, 70]], np.float32), (1280, 720), (320, 320), 0.6)
    assert close is not None and len(close) == 1
    assert plan_crops(regions, (640, 360), (320, 320), 0.6) is None  # two 320x320 crops cover 89 % of 640x360
    big = plan_crops(np.array([[100, 100, 900, 600]], np.float32), (1280, 720), (320, 320), 0.9)
    assert big is not None and big[0][2] - big[0][0] >= 800  # larger than the input: scaled down by the detector


def test_an_object_cut_by_a_crops_edge_is_counted_once_and_two_objects_twice():
    crops = np.array([[0, 0, 320, 320], [200, 0, 520, 320]])
    names = ("person",)
    # a person at frame x 290-340: crop 0 sees it cut by its right side (an inner side: the frame goes on), with a
    # higher score than crop 1, which sees it whole; crop 1 also sees another person at frame x 400-440
    cut = Detections.untracked(np.array([[290, 50, 320, 150]], np.float32), np.array([0.95], np.float32),
                               np.array([0]), names)  # fmt: skip
    whole = Detections.untracked(np.array([[90, 50, 140, 150], [200, 60, 240, 160]], np.float32),
                                 np.array([0.8, 0.7], np.float32), np.array([0, 0]), names)  # fmt: skip
    joined = join_crops([cut, whole], crops, (1280, 720), 0.45)
    np.testing.assert_allclose(joined.xyxy, [[290, 50, 340, 150], [400, 60, 440, 160]])
    # an object cut by both crops (x 250-450 in crops 0-400 and 300-700): both halves are cut, neither is dropped as
    # a duplicate of the other, and the NMS keeps one
    wide = np.array([[0, 0, 400, 320], [300, 0, 700, 320]])
    left = Detections.untracked(np.array([[250, 50, 400, 150]], np.float32), np.array([0.9], np.float32),
                                np.array([0]), names)  # fmt: skip
    right = Detections.untracked(np.array([[0, 50, 150, 150]], np.float32), np.array([0.8], np.float32),
                                 np.array([0]), names)  # fmt: skip
    np.testing.assert_allclose(join_crops([left, right], wide, (1280, 720), 0.45).xyxy, [[250, 50, 400, 150]])
    # an object on the frame's own edge is not cut: kept as the crop gives it
    edge = Detections.untracked(np.array([[0, 50, 30, 150]], np.float32), np.array([0.9], np.float32),
                                np.array([0]), names)  # fmt: skip
    assert len(join_crops([edge, Detections.empty(names)], crops, (1280, 720), 0.45)) == 1


def tracked(detections: list[Detections], indices: list[int], **settings) -> list[Frame]:
    context = PluginContext("cpu", {"a": CameraConfig(source="a")})
    tracker = ByteTrack(ByteTrackConfig(update_interval=0, **settings), context)
    tracker.start()
    frames = []
    for index, found in zip(indices, detections, strict=True):
        frame = Frame("a", index, 100.0 + index / 5, index / 5, np.zeros((8, 8, 3), np.uint8), detections=found)
        tracker.process([frame])
        add_track_events(frame)
        frames.append(frame)
    return frames


def test_the_trackers_clock_is_frames_processed_so_gated_frames_never_end_a_track():
    box = Detections.untracked(np.array([[10, 10, 50, 90]], np.float32), np.array([0.9], np.float32), np.array([0]),
                               ("person",))  # fmt: skip
    nothing = Detections.empty(("person",))
    # frame_rate 5, track_buffer 30: a lost track is kept 5 processed frames (ultralytics' count: it ends on the 7th
    # processed frame without it)
    gated = tracked([box] * 3 + [box], [0, 1, 2, 500], frame_rate=5)  # 497 frames gated between, none processed
    assert [e.type for f in gated for e in f.events].count("track.end") == 0
    assert gated[-1].detections.tracker_id.tolist() == gated[0].detections.tracker_id.tolist() == [1]
    lost = tracked([box] * 3 + [nothing] * 7, list(range(10)), frame_rate=5)  # 7 processed frames without it
    assert [e.type for f in lost[:-1] for e in f.events].count("track.end") == 0
    assert [e.type for e in lost[-1].events] == ["track.end"]


def lag_of_first_track_new(truth, gated, found) -> int:
    """The most frames by which a mover's first `track.new` came later with gating."""
    first_truth, first_gated = truth.firsts(), gated.firsts()
    lags = [first_gated[other] - first_truth[track] for track, other in found.items()
            if other is not None and track in first_truth and other in first_gated]  # fmt: skip
    return max(lags, default=0)


def test_a_quiet_camera_skips_most_frames_and_keeps_every_track_and_its_timing(tmp_path):
    images = quiet_scene(80, phase_s=5)[::2]  # 10 fps footage at the camera's 5: 400 frames, walkers a fifth of it
    truth = through_chain(images, CHAIN, None, tmp_path)
    gated = through_chain(images, CHAIN, {}, tmp_path)
    found = matched(truth.boxes, gated.boxes)
    assert len(truth.boxes) >= 20
    assert sum(other is not None for other in found.values()) / len(found) >= 0.97
    assert all(other is not None for other in matched(gated.boxes, truth.boxes).values())  # no track made up
    assert lag_of_first_track_new(truth, gated, found) <= 2
    assert gated.counts["saved"] >= 0.5 and gated.counts["gated"] + gated.counts["detected"] == len(images)
    # nothing is detected on the empty plaza once its tracks ended: every detected frame but the first (the tracker's
    # first, as ungated) is in a walkers' stretch or within 3 s after one
    shown = np.array([(i / 5 + 5) % 20 < 4 for i in range(len(images))], np.float64)
    near = np.convolve(shown, np.ones(16), mode="full")[: len(images)] > 0  # shown, or shown within 15 frames before
    assert gated.detected[0] == 0 and near[gated.detected[1:]].all()


def test_people_standing_still_are_gated_and_kept_alive_by_a_detection_every_interval(tmp_path):
    images = frozen_scene(4, 16, 2, start=100)[::2]  # 4 s walking, 16 s frozen, twice: 200 frames at 5 fps
    motion = {"stationary_after_s": 2, "stationary_interval_s": 5}
    truth = through_chain(images, CHAIN, None, tmp_path)
    gated = through_chain(images, CHAIN, motion, tmp_path)
    found = matched(truth.boxes, gated.boxes)
    assert sum(other is not None for other in found.values()) / len(found) >= 0.9
    assert gated.counts["saved"] >= 0.3
    for start in (20, 120):  # each freeze: the tracks seen as it settles are all alive at its end, kept alive by a
        alive = {track for track, seen in gated.boxes.items() if start + 10 in seen}  # detection every 5 s (25 frames)
        assert alive and all(start + 79 in gated.boxes[track] for track in alive)
        settled = [k for k in gated.detected if start + 20 <= k < start + 80]
        assert 1 <= len(settled) <= 6, settled


def test_lights_switching_and_a_shaking_camera_do_not_keep_the_detector_running(tmp_path):
    images, walkers = lights_scene(30)
    images, walkers = images[::2], walkers[::2]
    truth = through_chain(images, CHAIN, None, tmp_path)
    gated = through_chain(images, CHAIN, {}, tmp_path)
    assert gated.counts["global_changes"] >= 5
    assert gated.counts["saved"] >= 0.5
    found = matched(truth.boxes, gated.boxes)
    assert found and sum(other is not None for other in found.values()) / len(found) >= 0.9


def test_region_crops_find_the_small_distant_walkers_that_the_whole_frame_misses(tmp_path):
    frames = 150
    truth_run = through_chain([f for f in footage((640, 480))[:frames]], CHAIN, None, tmp_path)
    truth = {track: {k: to_distant(box, (640, 480)) for k, box in seen.items()}
             for track, seen in truth_run.boxes.items() if len(seen) >= 10}  # fmt: skip
    views = distant_scene(frames)
    whole = through_chain(views, CHAIN, {"detect": "full"}, tmp_path)
    crops = through_chain(views, CHAIN, {"detect": "regions"}, tmp_path)
    recall = {name: sum(v is not None for v in matched(truth, run.boxes).values()) / len(truth)
              for name, run in (("whole", whole), ("crops", crops))}  # fmt: skip
    assert len(truth) >= 10
    assert recall["whole"] <= 0.1 and recall["crops"] >= 0.35, recall
    assert crops.counts["crops_per_frame"] >= 0.9


def test_config_errors_name_the_motion_key_and_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"cameras:\n  a:\n    source: test://ball\n    motion:\n      threshold: 0\nplugins:\n{CHAIN}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "bad.yaml:5" in str(caught.value) and "cameras.a.motion.threshold" in str(caught.value)
    config.write_text(f"cameras:\n  a: {{source: test://ball}}\nmotion:\n  detect: crops\nplugins:\n{CHAIN}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "bad.yaml:4" in str(caught.value) and "motion.detect" in str(caught.value) and "regions" in str(caught.value)


def test_the_daemon_gates_a_quiet_camera_and_shows_it_in_status_metrics_and_camera_up(tmp_path):
    video = write_h264(quiet_scene(30, phase_s=15), tmp_path / "quiet.mp4")  # walkers from 5 s to 9 s, 25 s to 29 s
    metrics_port = free_port()
    camera = (f"  a:\n    source: {video}\n    fps: 5\n    motion:\n      masks:\n"
              "        - points: [[0, 0], [700, 0], [700, 40]]\n")  # fmt: skip
    config = service_config(tmp_path, camera, f"ipc://{tmp_path}/pub", plugins=CHAIN + "\n",
                            extra=f"metrics: {{enabled: true, port: {metrics_port}}}\n"
                            f"journal: {{path: {tmp_path}/journal.db}}\n")  # fmt: skip
    check = subprocess.run([sys.executable, "-m", "vigild", "check", "-c", str(config)], env=daemon_env(),
                           capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert check.returncode == 0 and "motion: threshold 25" in check.stdout
    service = Service(tmp_path, config)
    status, metrics = None, ""
    try:
        with ControlClient(service.control_endpoint, timeout=120) as client:
            deadline = time.monotonic() + 120
            while service.process.poll() is None and time.monotonic() < deadline:
                try:
                    reply, _ = client.request("status")
                except TimeoutError:
                    break
                motion = reply["result"]["cameras"]["a"].get("motion")
                if motion is not None and motion["gated"] + motion["detected"] >= 60:
                    status = motion
                    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
                    break
                time.sleep(0.5)
    finally:
        service.stop(60)
    assert status is not None, service.log_text()[-3000:]
    assert status["gated"] > 0 and status["detected"] > 0 and 0 < status["saved"] < 1
    text = metrics.decode()
    assert 'vigild_motion_frames_total{camera="a",result="gated"}' in text
    assert "motion mask 0 has a corner outside the 640x360 frame" in service.log_text()
    events = subprocess.run([sys.executable, "-m", "vigild", "events", "-j", str(tmp_path / "journal.db"),
                             "--type", "camera.up"],
                            env=daemon_env(), capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    ups = [json.loads(line) for line in events.stdout.splitlines() if line.strip()]
    assert ups, events.stderr
    assert ups[0]["warnings"] == ["motion mask 0 has a corner outside the 640x360 frame (drawn for another size?)"]


def test_the_gate_detects_what_tracks_need_and_forgets_a_track_its_tracker_never_ends():
    """The gate alone, fed what a tracker would say (set by the test, not a tracker): a still frame throughout."""
    from vigild.config.motion import MotionConfig as Config
    from vigild.pipeline.gate import LOST_FRAMES, MotionGate

    gate = MotionGate({"a": Config(stationary_after_s=1, stationary_interval_s=4)})
    image = grey_frame()
    person = Detections(np.array([[100, 100, 140, 200]], np.float32), np.array([0.9], np.float32),
                        np.array([0]), np.array([7]), ("person",))  # fmt: skip

    def step(k: int, seen: bool) -> bool:
        frame = Frame("a", k, 1000.0 + k / 5, k / 5, image)
        if not gate.select([frame]):
            assert frame.motion is not None and frame.motion.gated
            return False
        frame.detections = person if seen else Detections.empty(("person",))
        gate.observe([frame])
        return True

    # a track standing still, seen whenever detected: through while it is new (1 s), then every 4 s
    through = [k for k in range(60) if step(k, seen=True)]
    assert through == [0, 1, 2, 3, 4, 24, 44], through  # 5 frames a second: moving until 1 s, then every 4 s
    # then not found on its next detection (64, 4 s after 44; its tracker never says it ended): through on every
    # frame while it is lost, forgotten after LOST_FRAMES of them, gated after that
    lost = [k for k in range(60, 64 + LOST_FRAMES + 20) if step(k, seen=False)]
    assert lost == list(range(64, 64 + LOST_FRAMES + 1)), (lost[:3], lost[-3:])
