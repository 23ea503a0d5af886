"""Typed track state on the frame: what a tracker decided, as plugins after it see it, and the track events made
from it once the frame has been through the chain; what the plugins keep of a frame once it has gone."""

from __future__ import annotations

import gc
import weakref
from typing import Literal

import numpy as np
from known_models import RectangleYolo
from test_analytics import CAMERA, started_chain

from vigild.config.loading import CameraConfig
from vigild.frame import Detections, Frame, Tracks
from vigild.plugin import FrameErrors, Plugin, PluginConfig
from vigild.plugins.analytics.analytics import Analytics, AnalyticsConfig
from vigild.plugins.detection.yolo import YoloBackend
from vigild.plugins.tracking.bytetrack import ByteTrack, ByteTrackConfig

WIDTH, HEIGHT = 1000, 800
IMAGE = np.zeros((HEIGHT, WIDTH, 3), np.uint8)


class ProbeConfig(PluginConfig):
    type: Literal["probe"] = "probe"


class Probe(Plugin[ProbeConfig]):
    """A plugin after the tracker: records the typed track state of each frame and the events it can see."""

    Config = ProbeConfig

    def start(self) -> None:
        self.seen: dict[int, tuple[Tracks | None, Detections, list[str]]] = {}

    def process(self, frames: list[Frame]) -> None:
        for frame in frames:
            self.seen[frame.index] = (frame.tracks, frame.detections, [e.type for e in frame.events])


def walkers(frames: int, vanish_after: int) -> list[Frame]:
    """Two people walking down the image, 5 px a frame at 10 fps, boxes 40 x 80 px: A at x = 200, not seen after
    frame `vanish_after`, and B at x = 700 all along."""
    out = []
    for i in range(frames):
        xs = [200.0, 700.0] if i <= vanish_after else [700.0]
        boxes = np.array([[x - 20, 100 + 5 * i, x + 20, 180 + 5 * i] for x in xs], np.float32)
        detections = Detections.untracked(boxes, np.full(len(xs), 0.9, np.float32), np.zeros(len(xs), np.int32),
                                          ("person",))  # fmt: skip
        out.append(Frame("cam", i, 1000.0 + i / 10, 0.0, IMAGE, detections=detections))
    return out


def test_a_plugin_after_the_tracker_sees_its_decisions_as_typed_state_and_the_events_say_the_same():
    tracker = ByteTrackConfig(update_interval=0.5, track_buffer=9)  # lost for 10 frames: ended
    analytics = AnalyticsConfig(min_frames=2, loiter_s=None)
    chain = started_chain({"cam": CAMERA}, ("bytetrack", ByteTrack, tracker), ("probe", Probe, ProbeConfig()),
                          ("analytics", Analytics, analytics))  # fmt: skip
    probe = chain.stages[1].instances[0][0]
    assert isinstance(probe, Probe)
    frames = walkers(60, vanish_after=20)
    for start in range(0, len(frames), 4):
        assert len(chain.process(frames[start : start + 4])) == len(frames[start : start + 4])
    a, b = frames[0].detections.tracker_id.tolist()  # confirmed on the tracker's first frame
    ends = {}
    for frame in frames:
        tracks, detections, events_then = probe.seen[frame.index]
        assert tracks is not None and tracks is frame.tracks
        assert not any(kind.startswith("track.") for kind in events_then)  # made after the chain, not by the tracker
        kinds = [e.type for e in frame.events]
        ids = {kind: [e.object["track_id"] for e in frame.events if e.type == kind] for kind in kinds if kind.startswith("track.")}
        assert detections.tracker_id[tracks.new].tolist() == ids.get("track.new", [])
        assert detections.tracker_id[tracks.updated].tolist() == ids.get("track.update", [])
        assert tracks.ended.track_id.tolist() == ids.get("track.end", [])
        track_kinds = [k for k in kinds if k.startswith("track.")]
        assert kinds[: len(track_kinds)] == track_kinds, "the tracker's events come first, as the tracker ran first"
        assert track_kinds == sorted(track_kinds, key=["track.new", "track.update", "track.end"].index)
        ends.update({track_id: (frame.index, tracks.ended) for track_id in tracks.ended.track_id.tolist()})
    assert frames[0].tracks is not None and frames[0].tracks.new.tolist() == [0, 1]
    assert all(b in f.detections.tracker_id for f in frames) and list(ends) == [a]  # only A ended; B walks on
    at, ended = ends[a]
    assert at == 31 and ended.reason == "lost"  # lost too long on frame 30 (10 > 9 frames), gone on the next
    last = ended.last_seen
    assert last.data["last_frame"].tolist() == [20] and last.data["first_frame"].tolist() == [0]
    assert last.data["frames"].tolist() == [21]
    np.testing.assert_allclose(last.xyxy[0], [180, 200, 220, 280])  # where A was last seen, frame 20
    assert last.label(0) == "person" and abs(float(last.data["last_ts"][0]) - 1002.0) < 1e-9
    (end,) = [e for e in frames[at].events if e.type == "track.end"]
    assert end.object["bbox"] == [180.0, 200.0, 220.0, 280.0]
    assert (end.data["frames"], end.data["duration_s"], end.data["reason"]) == (21, 2.0, "lost")


class DropConfig(PluginConfig):
    type: Literal["drop"] = "drop"


class DropFirst(Plugin[DropConfig]):
    """A plugin after the tracker that replaces the detections with other rows (all but the first)."""

    Config = DropConfig

    def process(self, frames: list[Frame]) -> None:
        for frame in frames:
            frame.detections = frame.detections[1:]


def test_track_events_describe_the_trackers_detections_when_a_later_plugin_changes_the_rows():
    """The indices of `frame.tracks` are rows of the detections the tracker labelled: if a later plugin replaces
    them with other rows, the track events still describe the objects the tracker saw (as with no such plugin)."""

    def events_with(*later: tuple[str, type[Plugin], PluginConfig]) -> list[dict]:
        chain = started_chain({"cam": CAMERA}, ("bytetrack", ByteTrack, ByteTrackConfig(update_interval=0.3)), *later)
        out = []
        for frame in walkers(50, vanish_after=10):
            chain.process([frame])
            out += [e.to_json_dict(0, "x") for e in frame.events]
        return out

    plain = events_with()
    assert len(plain) >= 10 and {e["type"] for e in plain} == {"track.new", "track.update", "track.end"}
    assert events_with(("drop", DropFirst, DropConfig())) == plain


class RectConfig(PluginConfig):
    type: Literal["rect"] = "rect"


class RectSegmenter(Plugin[RectConfig]):
    """A segment model with known output: the white rectangle of each frame, with its mask."""

    Config = RectConfig
    made: list[Detections]

    def start(self) -> None:
        self.backend = YoloBackend(RectangleYolo("segment"), "segment", ("box", "other"), (640, 384), 0.5,
                                          0.45, "cpu", False)  # fmt: skip
        self.made = []

    def process(self, frames: list[Frame]) -> None:
        for frame, detections in zip(frames, self.backend.detect([f.image for f in frames]), strict=True):
            frame.detections = detections
            self.made.append(detections)


def rectangle_frames(first: int, count: int) -> list[Frame]:
    frames = []
    for i in range(first, first + count):
        image = np.full((480, 800, 3), 30, np.uint8)
        if not 20 <= i < 30:  # gone for 10 frames: its track ends; another starts when it is back
            image[150:330, 50 + 7 * i : 110 + 7 * i] = 255
        frames.append(Frame("m", i, 3000.0 + i / 10, 0.0, image))
    return frames


def own_masks(detections: Detections) -> int:
    """How many masks the detections have, each checked to be its own array, not a view into another."""
    assert detections.masks is not None
    for mask in detections.masks:
        assert mask.probabilities.base is None and mask.probabilities.flags.owndata
    return len(detections.masks)


def test_masks_own_their_crop_and_no_plugin_keeps_a_frames_detections_once_it_has_gone():
    """An `InstanceMask` copies its crop out of the batch's mask array, so whatever keeps a mask keeps only that
    crop; the tracker and analytics keep each track's own last sighting, never a frame's detections."""
    cameras = {"m": CameraConfig(source="m", zones={"z": {"points": [[300, 100], [600, 100], [600, 400], [300, 400]]}})}
    chain = started_chain(cameras, ("rect", RectSegmenter, RectConfig()),
                          ("bytetrack", ByteTrack, ByteTrackConfig(track_buffer=5)),
                          ("analytics", Analytics, AnalyticsConfig(min_frames=2)))  # fmt: skip
    segmenter = chain.stages[0].instances[0][0]
    assert isinstance(segmenter, RectSegmenter)
    gone: list[weakref.ref] = []
    events = []
    for start in range(0, 45, 3):
        frames = chain.process(rectangle_frames(start, 3))
        assert len(frames) == 3
        events += [e for f in frames for e in f.events]
        gone += [weakref.ref(f.detections) for f in frames] + [weakref.ref(d) for d in segmenter.made]
        assert [own_masks(d) for d in segmenter.made] == [0 if 20 <= f.index < 30 else 1 for f in frames]
        segmenter.made.clear()
        del frames
    gc.collect()
    assert [ref for ref in gone if ref() is not None] == []
    events += chain.source_ended("m", 3005.0, 44)
    ends = [e for e in events if e.type == "track.end"]
    assert [(e.data["reason"], e.data["last_frame"]) for e in ends] == [("lost", 19), ("source_end", 44)]
    for end in ends:  # the mask of where each was last seen: the rectangle of frame 19, of frame 44
        x = 50 + 7 * end.data["last_frame"]
        points = np.concatenate([np.reshape(p, (-1, 2)) for p in end.object["mask"]["polygons"]])
        np.testing.assert_allclose(points.min(0), [x, 150], atol=4)
        np.testing.assert_allclose(points.max(0), [x + 59, 329], atol=4)
    assert {e.type for e in events} >= {"track.new", "track.update", "zone.enter", "zone.exit"}


class FailOnConfig(PluginConfig):
    type: Literal["fail_on"] = "fail_on"
    index: int = 0


class FailOn(Plugin[FailOnConfig]):
    """A plugin after the tracker that fails on one frame (and names it), as a model that cannot take it would."""

    Config = FailOnConfig

    def process(self, frames: list[Frame]) -> None:
        bad = {p: RuntimeError("injected") for p, f in enumerate(frames) if f.index == self.config.index}
        if bad:
            raise FrameErrors(bad)


def test_a_frame_a_later_plugin_fails_on_still_carries_the_trackers_events():
    """The scheduler publishes what earlier plugins decided about a frame a later plugin failed on: the track events
    of that frame too, so that every track.end has its track.new."""
    chain = started_chain({"cam": CAMERA}, ("bytetrack", ByteTrack, ByteTrackConfig()),
                          ("fail_on", FailOn, FailOnConfig(index=0)))  # fmt: skip
    frames = walkers(30, vanish_after=30)
    events = []
    for frame in frames:
        chain.process([frame])
        events += frame.events  # as the scheduler publishes them, passed or not
    events += chain.source_ended("cam", 1004.0, 29)
    new = [e.object["track_id"] for e in events if e.type == "track.new"]
    ended = [e.object["track_id"] for e in events if e.type == "track.end"]
    assert sorted(ended) == [1, 2] and sorted(new) == sorted(ended)
