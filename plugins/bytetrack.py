"""ByteTrack multi-object tracker, one independent tracker per camera, over any detector's output.

The association itself is ultralytics' BYTETracker (Kalman filter + two-stage IoU matching with `lap`). vigild
numbers tracks itself, per camera, from 1: ids are never shared between cameras and never reused on a camera,
also when its tracker is rebuilt after the source ended (older ultralytics releases kept one global counter that
creating any tracker reset). Events: `track.new`, `track.update` (at most every `update_interval` seconds per
track), `track.end` with the track's duration.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import Field

from vigild.events import Event, object_payload
from vigild.frame import Detections, Frame
from vigild.plugin import Plugin, PluginConfig


class ByteTrackConfig(PluginConfig):
    type: Literal["bytetrack"] = "bytetrack"
    track_high_thresh: float = Field(0.25, ge=0, le=1, description="Detections at or above this are matched first.")
    track_low_thresh: float = Field(
        0.1, ge=0, le=1, description="Detections between this and the high threshold are matched second."
    )
    new_track_thresh: float = Field(
        0.25, ge=0, le=1, description="An unmatched detection starts a track at or above this."
    )
    match_thresh: float = Field(0.8, gt=0, le=1, description="Largest IoU cost accepted in the first matching stage.")
    track_buffer: int = Field(
        30, ge=1, description="How long a lost track is kept before it ends: frames at 30 fps (see frame_rate)."
    )
    frame_rate: float = Field(
        30.0,
        gt=0,
        description="Frames per second this tracker is given (the camera's `fps` limit, if any): a lost track is kept "
        "for track_buffer x frame_rate / 30 processed frames, i.e. the same time at any rate.",
    )
    fuse_score: bool = True
    update_interval: float = Field(
        1.0, ge=0, description="Seconds between track.update events of one track; 0 = every frame."
    )


class _TrackerInput:
    """The results-like view BYTETracker reads: `conf`, `cls`, `xywh`, `xyxy`, boolean indexing."""

    def __init__(self, xyxy: np.ndarray, conf: np.ndarray, cls: np.ndarray):
        self.xyxy = xyxy
        self.conf = conf
        self.cls = cls

    @property
    def xywh(self) -> np.ndarray:
        wh = self.xyxy[:, 2:4] - self.xyxy[:, 0:2]
        return np.concatenate([self.xyxy[:, 0:2] + wh / 2, wh], axis=1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, index: Any) -> _TrackerInput:
        return _TrackerInput(self.xyxy[index], self.conf[index], self.cls[index])


@dataclass
class _Track:
    id: int
    first_ts: float
    first_frame: int
    last_ts: float
    last_frame: int
    last_event_ts: float
    frames: int
    last_seen: tuple[Detections, int]
    """The detections of the frame it was last seen in and its index there; made into JSON only for an event."""


@dataclass
class _CameraTracks:
    tracker: Any
    next_id: int
    ours: dict[int, int] = field(default_factory=dict)
    """ultralytics' track id -> our id, for tracks announced with track.new."""
    live: dict[int, _Track] = field(default_factory=dict)


class ByteTrack(Plugin[ByteTrackConfig]):
    Config = ByteTrackConfig
    batched = False  # state per camera: a failure must not make the chain run a frame through it twice

    def start(self) -> None:
        self._tracker_class = self._tracker_type()
        self._args = self._tracker_args()
        self._cameras: dict[str, _CameraTracks] = {}
        self._next_ids: dict[str, int] = {}

    def process(self, frames: list[Frame]) -> None:
        for frame in frames:  # one per call (batched = False); the loop keeps direct callers working
            self._track(frame)

    def _tracker_type(self) -> Any:
        from ultralytics.trackers.byte_tracker import BYTETracker

        return BYTETracker

    def _tracker_args(self) -> Namespace:
        c = self.config
        return Namespace(
            track_high_thresh=c.track_high_thresh,
            track_low_thresh=c.track_low_thresh,
            new_track_thresh=c.new_track_thresh,
            track_buffer=max(1, round(c.track_buffer * c.frame_rate / 30)),  # in processed frames
            match_thresh=c.match_thresh,
            fuse_score=c.fuse_score,
        )

    def _image_for(self, frame: Frame) -> np.ndarray | None:
        """The frame's pixels, for trackers that look at them (BoT-SORT's camera-motion compensation); None here."""
        return None

    def _camera(self, camera: str) -> _CameraTracks:
        state = self._cameras.get(camera)
        if state is None:
            state = _CameraTracks(self._tracker_class(self._args), self._next_ids.get(camera, 1))
            self._cameras[camera] = state
        return state

    def _track(self, frame: Frame) -> None:
        state = self._camera(frame.camera)
        detections = frame.detections
        output = state.tracker.update(
            _TrackerInput(detections.xyxy, detections.confidence, detections.class_id), self._image_for(frame)
        )
        tracker_id = np.full(len(detections), -1, np.int64)
        seen: list[tuple[int, int]] = []  # (our id, detection index)
        if len(output):
            their_ids = output[:, 4].astype(np.int64)
            det_index = output[:, 7].astype(np.int64)
            for theirs, index in zip(their_ids.tolist(), det_index.tolist(), strict=True):
                ours = state.ours.get(theirs)
                if ours is None:
                    ours = state.ours[theirs] = state.next_id
                    state.next_id += 1
                tracker_id[index] = ours
                seen.append((ours, index))
        frame.detections = detections.with_tracker_ids(tracker_id)
        self._emit(frame, state, seen)

    def _emit(self, frame: Frame, state: _CameraTracks, seen: list[tuple[int, int]]) -> None:
        detections, ts = frame.detections, frame.ts_wall
        interval = self.config.update_interval
        for ours, index in seen:
            track = state.live.get(ours)
            if track is None:
                state.live[ours] = _Track(ours, ts, frame.index, ts, frame.index, ts, 1, (detections, index))
                frame.events.append(
                    Event("track.new", frame.camera, ts, frame.index, object_payload(detections, index))
                )
                continue
            track.last_ts, track.last_frame, track.frames = ts, frame.index, track.frames + 1
            track.last_seen = (detections, index)
            if ts - track.last_event_ts >= interval:
                payload = object_payload(detections, index)
                track.last_event_ts = ts
                frame.events.append(
                    Event(
                        "track.update", frame.camera, ts, frame.index, payload, {"age_s": round(ts - track.first_ts, 3)}
                    )
                )
        tracker = state.tracker
        alive = {t.track_id for t in tracker.tracked_stracks} | {t.track_id for t in tracker.lost_stracks}
        for theirs in [theirs for theirs in state.ours if theirs not in alive]:
            ours = state.ours.pop(theirs)
            ended = state.live.pop(ours, None)
            if ended is not None:
                frame.events.append(self._end_event(frame.camera, ended, ts, frame.index, "lost"))

    @staticmethod
    def _end_event(camera: str, track: _Track, ts: float, frame_index: int, reason: str) -> Event:
        return Event(
            "track.end",
            camera,
            ts,
            frame_index,
            object_payload(*track.last_seen),
            {
                "reason": reason,
                "duration_s": round(track.last_ts - track.first_ts, 3),
                "frames": track.frames,
                "first_frame": track.first_frame,
                "last_frame": track.last_frame,
            },
        )

    def on_source_end(self, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        state = self._cameras.pop(camera, None)
        if state is None:
            return []
        self._next_ids[camera] = state.next_id  # a rebuilt tracker goes on counting: ids are never reused
        return [
            self._end_event(camera, track, ts_wall, frame_index if frame_index >= 0 else track.last_frame, "source_end")
            for track in state.live.values()
        ]
