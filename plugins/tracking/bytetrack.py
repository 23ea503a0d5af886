"""ByteTrack multi-object tracker over any detector's output: each camera tracked on its own, all cameras of a
batch in one vectorised step.

The association is ByteTrack as ultralytics implements it (Kalman filter, two-stage IoU matching, `lap.lapjv` for
the assignment), held as arrays for every camera at once (plugins/tracking/multicamera_tracker.py: one Kalman
predict, one IoU computation and one Kalman update per batch instead of per track). Ids are numbered per camera
from 1: never shared between cameras, never reused on a camera, also when its tracker restarts after the source
ended. The plugin sets `frame.tracks` (vigild.frame.Tracks): which tracks were confirmed, are due a `track.update`
(at most every `update_interval` seconds per track) and ended on the frame; vigild.events makes the `track.new`,
`track.update` and `track.end` events from it once the frame has been through the chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from vigild.events import Event, track_end_events
from vigild.frame import EndedTracks, Frame, Tracks
from vigild.plugin import FrameErrors, Plugin, PluginConfig
from vigild.plugins.tracking.box_kalman import BoxForm
from vigild.plugins.tracking.multicamera_tracker import (
    AssociationSettings,
    CameraFrame,
    FrameTracks,
    MultiCameraTracker,
)
from vigild.plugins.tracking.track_table import TrackTable


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
        le=1000,
        description="Frames per second this tracker is given (the camera's `fps` limit, if any): a lost track is kept "
        "for track_buffer x frame_rate / 30 processed frames, i.e. the same time at any rate.",
    )
    fuse_score: bool = True
    update_interval: float = Field(
        1.0, ge=0, description="Seconds between track.update events of one track; 0 = every frame."
    )


@dataclass
class _CameraCadence:
    ids: np.ndarray
    """The camera's live tracks' ids, ascending (the tracker numbers them upwards)."""
    first: np.ndarray
    """Per track: when it was confirmed."""
    last: np.ndarray
    """Per track: when it last had an event."""
    earliest: float = math.inf
    """At most the smallest of `last`."""


class UpdateCadence:
    """When a camera's tracks are due a `track.update`: never on the frame that confirmed them, then once at least
    `interval` seconds have passed since the track's last event."""

    def __init__(self, interval: float):
        self.interval = interval
        self._cameras: dict[str, _CameraCadence] = {}

    def due(self, camera: str, ts: float, tracks: FrameTracks) -> tuple[np.ndarray, np.ndarray]:
        """The detections of `camera`'s frame at `ts` whose tracks are due an update (in the order of
        `tracks.tracked`), and each one's age in seconds since confirmed; remembers that they had one."""
        known = self._cameras.get(camera) or _CameraCadence(np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
        ids, first, last, earliest = known.ids, known.first, known.last, known.earliest
        if len(tracks.ended):
            live = ~np.isin(ids, tracks.ended.tracker_id)
            ids, first, last = ids[live], first[live], last[live]
        old = len(ids)
        if len(tracks.new):
            now = np.full(len(tracks.new), ts)
            ids = np.concatenate([ids, tracks.tracker_id[tracks.new]])
            first, last = np.concatenate([first, now]), np.concatenate([last, now])
            earliest = min(earliest, ts)
        if ts - earliest < self.interval:  # then so is ts - last for every track: none is due
            self._cameras[camera] = _CameraCadence(ids, first, last, earliest)
            return _NONE_DUE
        row = np.searchsorted(ids, tracks.tracker_id[tracks.tracked])
        due = (row < old) & (ts - last[row] >= self.interval)
        row = row[due]
        last[row] = ts
        self._cameras[camera] = _CameraCadence(ids, first, last, float(last.min()) if len(last) else math.inf)
        return tracks.tracked[due], ts - first[row]

    def forget(self, camera: str) -> None:
        self._cameras.pop(camera, None)


_NONE_DUE = (np.zeros(0, np.int64), np.zeros(0))


class ByteTrack(Plugin[ByteTrackConfig]):
    Config = ByteTrackConfig
    requires: ClassVar[frozenset[str]] = frozenset({"detections"})
    provides: ClassVar[frozenset[str]] = frozenset({"tracks"})
    batched = True  # one step for every camera of the batch; a bad frame is named with FrameErrors, never rerun
    box_form: BoxForm = "xyah"

    def start(self) -> None:
        c = self.config
        settings = AssociationSettings(
            high_thresh=c.track_high_thresh,
            low_thresh=c.track_low_thresh,
            new_track_thresh=c.new_track_thresh,
            match_thresh=c.match_thresh,
            max_frames_lost=max(1, round(c.track_buffer * c.frame_rate / 30)),  # in processed frames
            fuse_score=c.fuse_score,
        )
        self._tracker = MultiCameraTracker(settings, self.box_form, self._motion_compensation())
        self._cadence = UpdateCadence(c.update_interval)

    def _motion_compensation(self) -> str | None:
        """BoT-SORT's camera-motion compensation method, None for none."""
        return None

    def process(self, frames: list[Frame]) -> None:
        errors: dict[int, Exception] = {}
        rounds: list[list[int]] = []  # one frame per camera in each (a batch can hold two frames of one camera)
        placed: dict[str, int] = {}
        for position, frame in enumerate(frames):
            detections = frame.detections
            if not (np.isfinite(detections.xyxy).all() and np.isfinite(detections.confidence).all()):
                errors[position] = ValueError("detections with non-finite boxes or confidences")
                continue
            which = placed.get(frame.camera, -1) + 1
            placed[frame.camera] = which
            if which == len(rounds):
                rounds.append([])
            rounds[which].append(position)
        image = self._motion_compensation() is not None
        for number, positions in enumerate(rounds):
            batch = [frames[p] for p in positions]
            try:
                results = self._tracker.step(
                    [CameraFrame(f.camera, f.detections, f.ts_wall, f.index, f.image if image else None) for f in batch]
                )
            except Exception as exc:  # the tracks are as before this round; later rounds need this one's frames
                errors.update({p: exc for later in rounds[number:] for p in later})
                break
            for frame, result in zip(batch, results, strict=True):
                frame.detections = frame.detections.with_tracker_ids(result.tracker_id)
                due, ages = self._cadence.due(frame.camera, frame.ts_wall, result)
                ended = EndedTracks(result.ended, "lost", TrackTable.lifetimes(result.ended))
                frame.tracks = Tracks(frame.detections, result.new, due, ages, ended, len(frame.events))
        if errors:
            raise FrameErrors(errors)

    def on_source_end(self, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        ended = self._tracker.drop_camera(camera)
        self._cadence.forget(camera)
        return track_end_events(camera, ts_wall, frame_index, EndedTracks(ended, "source_end", TrackTable.lifetimes(ended)))
