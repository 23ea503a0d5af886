"""ByteTrack on the real detector's output: stable ids, per-camera numbering, and the track event lifecycle."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from test_detector import as_frames, darknet, read_frames

from vigild.events import add_track_events
from vigild.frame import Frame
from vigild.plugin import PluginContext
from vigild.plugins.tracking.bytetrack import ByteTrack, ByteTrackConfig


def tracker(**overrides) -> ByteTrack:
    config = ByteTrackConfig(**({"track_high_thresh": 0.3, "new_track_thresh": 0.3} | overrides))
    plugin = ByteTrack(config, PluginContext("cpu", {}))
    plugin.start()
    return plugin


@pytest.fixture(scope="module")
def detected() -> list[Frame]:
    """The first 150 frames of vtest.avi with real detections, as the example config makes them."""
    detector = darknet(confidence=0.1)
    frames = as_frames(read_frames(150))
    for start in range(0, len(frames), 8):
        detector.process(frames[start : start + 8])
    return frames


def longest_runs(frames: list[Frame]) -> dict[int, int]:
    """Longest run of consecutive frames in which each track id is present."""
    best: Counter[int] = Counter()
    current: Counter[int] = Counter()
    for frame in frames:
        ids = set(frame.detections.tracker_id[frame.detections.tracker_id >= 0].tolist())
        current = Counter({i: current[i] + 1 for i in ids})
        for i, run in current.items():
            best[i] = max(best[i], run)
    return dict(best)


def copy_frames(frames: list[Frame], camera: str) -> list[Frame]:
    return [Frame(camera, f.index, f.ts_wall, f.ts_mono, f.image, detections=f.detections) for f in frames]


def test_at_least_three_people_keep_their_id_for_30_consecutive_frames(detected):
    frames = copy_frames(detected, "vtest")
    plugin = tracker()
    for frame in frames:
        plugin.process([frame])
    runs = longest_runs(frames)
    long_lived = sorted(run for run in runs.values() if run >= 30)
    assert len(long_lived) >= 3, f"longest runs: {sorted(runs.values(), reverse=True)[:8]}"


def test_each_camera_numbers_its_own_tracks_from_one(detected):
    plugin = tracker()
    door, yard = copy_frames(detected[:60], "door"), copy_frames(detected[:60], "yard")
    for i in range(60):
        plugin.process([door[i], yard[i]])  # both cameras in one batch, as the scheduler sends them
        if i == 30:
            plugin.on_source_end("yard", 0.0, i)  # ending one camera must not renumber the other
    door_ids = [f.detections.tracker_id.tolist() for f in door]
    yard_ids = [f.detections.tracker_id.tolist() for f in yard]
    assert door_ids[:31] == yard_ids[:31]  # same input, same ids: nothing shared between cameras
    assert min(i for ids in door_ids for i in ids if i >= 0) == 1
    before = {i for ids in yard_ids[:31] for i in ids if i >= 0}
    after = {i for ids in yard_ids[31:] for i in ids if i >= 0}
    assert after and min(after) > max(before), "a rebuilt tracker must not reuse the camera's ids"
    assert door_ids[31:] != yard_ids[31:]


def test_event_lifecycle_new_update_end(detected):
    frames = copy_frames(detected, "vtest")
    plugin = tracker(update_interval=0.5)
    for i, frame in enumerate(frames):
        frame.ts_wall = 1000.0 + i * 0.1  # the file's own 10 fps
        plugin.process([frame])
        add_track_events(frame)  # as the chain does once a frame has been through every plugin
    events = [e for f in frames for e in f.events]
    events += plugin.on_source_end("vtest", 1000.0 + len(frames) * 0.1, frames[-1].index)
    by_type: dict[str, list] = {}
    for event in events:
        by_type.setdefault(event.type, []).append(event)
    new_ids = [e.object["track_id"] for e in by_type["track.new"]]
    end_ids = [e.object["track_id"] for e in by_type["track.end"]]
    assert len(new_ids) == len(set(new_ids)) and sorted(new_ids) == sorted(end_ids)
    assert {e.data["reason"] for e in by_type["track.end"]} == {"lost", "source_end"}
    first_seen = {e.object["track_id"]: e.ts_wall for e in by_type["track.new"]}
    for end in by_type["track.end"]:
        assert end.data["duration_s"] >= 0 and end.data["frames"] >= 1
        assert end.ts_wall >= first_seen[end.object["track_id"]]
    last_update: dict[int, float] = {}
    for update in by_type["track.update"]:
        track_id = update.object["track_id"]
        assert update.ts_wall - last_update.get(track_id, first_seen[track_id]) >= 0.5 - 1e-9  # rate limit holds
        last_update[track_id] = update.ts_wall
    assert by_type["track.update"], "long-lived tracks must get updates"
    sample = by_type["track.new"][0].object
    assert set(sample) == {"track_id", "label", "class_id", "confidence", "bbox"} and sample["label"] == "person"


def test_tracked_detections_keep_detector_boxes(detected):
    frame = copy_frames(detected[:2], "vtest")
    plugin = tracker()
    plugin.process(frame[:1])
    plugin.process(frame[1:])
    d = frame[1].detections
    np.testing.assert_array_equal(d.xyxy, detected[1].detections.xyxy)
    assert (d.tracker_id >= 1).sum() >= 3
