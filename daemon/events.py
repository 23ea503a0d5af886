"""Events: what plugins and the daemon tell subscribers. The wire format is documented in docs/events.md."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from vigild.frame import TRACK_UPDATE_FIELDS, Detections, EndedTracks, Frame
from vigild.vision.snapshot import Snapshot

SCHEMA_VERSION = 1
TOPIC_ROOT = "vigild"
SYSTEM_CAMERA = "sys"
"""Pseudo-camera of daemon-wide events such as the heartbeat; no real camera may take this name."""
ENVELOPE = frozenset({"schema", "seq", "id", "run", "type", "camera", "frame", "ts", "object", "snapshot"})
"""The fields every event has (or may have): a key of the same name in `data` is dropped."""
MAX_COLLISIONS_LOGGED = 1000

log = logging.getLogger("vigild.events")
_collisions: set[tuple[str, str]] = set()
"""(event type, key) pairs already logged: each is logged once."""


@dataclass
class Event:
    """One event before the publisher stamps it with `seq`, `id` and `run` (as it takes it: its identity is fixed
    before it is queued, sent or stored).

    `data` holds the type-specific fields; they go to the top level of the JSON next to the common ones (a key
    that is one of those, ENVELOPE, is dropped and logged once per event type).
    """

    type: str
    camera: str
    ts_wall: float
    frame: int | None = None
    object: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    snapshot: Snapshot | None = None
    """A JPEG sent as the message's third part; the JSON's `snapshot` field describes it."""

    @property
    def topic(self) -> str:
        return f"{TOPIC_ROOT}.{self.camera}.{self.type}"

    @property
    def is_heartbeat(self) -> bool:
        """The daemon's heartbeat, which has a sequence of its own (never in the events' `seq`)."""
        return self.type == "heartbeat" and self.camera == SYSTEM_CAMERA

    def to_json_dict(self, seq: int, event_id: str, run: str = "") -> dict[str, Any]:
        body: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "seq": seq,
            "id": event_id,
            "run": run,
            "type": self.type,
            "camera": self.camera,
            "frame": self.frame if self.frame is None or self.frame >= 0 else None,  # -1: no frame (a stop)
            "ts": iso_utc(self.ts_wall),
        }
        if self.object is not None:
            body["object"] = self.object
        if self.snapshot is not None:
            body["snapshot"] = self.snapshot.describe()
        for key, value in self.data.items():
            if key in ENVELOPE:  # a plugin's data never overwrites what subscribers rely on (seq, id, camera...)
                _collision(self.type, key)
            else:
                body[key] = value
        return body


Publish = Callable[[Event], None]
"""Where events go: the daemon hands every maker of events its bus's `publish` (vigild.outputs.bus)."""


def _collision(event_type: str, key: str) -> None:
    if (event_type, key) not in _collisions and len(_collisions) < MAX_COLLISIONS_LOGGED:
        _collisions.add((event_type, key))
        log.warning("%s events: dropped the data field %r, which is an envelope field", event_type, key)


def iso_utc(ts_wall: float) -> str:
    """ISO 8601 in UTC with millisecond precision and a `Z` suffix, e.g. `2026-11-23T10:15:02.123Z`."""
    return datetime.fromtimestamp(ts_wall, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def object_payload(detections: Detections, i: int) -> dict[str, Any]:
    """The `object` field of an event about detection `i`."""
    x1, y1, x2, y2 = (round(float(v), 1) for v in detections.xyxy[i])
    payload: dict[str, Any] = {
        "track_id": int(detections.tracker_id[i]),
        "label": detections.label(i),
        "class_id": int(detections.class_id[i]),
        "confidence": round(float(detections.confidence[i]), 4),
        "bbox": [x1, y1, x2, y2],
    }
    if detections.masks is not None and detections.masks[i] is not None:
        payload["mask"] = detections.masks[i].to_json()
    if detections.keypoints is not None:
        payload["keypoints"] = np.round(detections.keypoints[i], 3).tolist()
    return payload


def add_track_events(frame: Frame) -> None:
    """The frame's `track.new`, `track.update` and `track.end` events, made from what its tracker decided
    (`frame.tracks`), put where the tracker stood among the frame's events. Called once a frame has been through
    the whole chain, so that what later plugins added to its detections rides along (`TRACK_UPDATE_FIELDS`: the
    action recognizer's current top `actions` on `track.update`)."""
    tracks = frame.tracks
    if tracks is None or not (len(tracks.new) or len(tracks.updated) or len(tracks.ended)):
        return
    detections, ids = frame.detections, frame.detections.tracker_id
    if ids is not tracks.detections.tracker_id and not np.array_equal(ids, tracks.detections.tracker_id):
        detections = tracks.detections  # a later plugin replaced the detections with other rows: as the tracker saw them
    camera, ts, index = frame.camera, frame.ts_wall, frame.index
    events = [Event("track.new", camera, ts, index, object_payload(detections, i)) for i in tracks.new.tolist()]
    extra = detections.data.get(TRACK_UPDATE_FIELDS)  # what later plugins add to each object's update
    for i, age in zip(tracks.updated.tolist(), tracks.age_s.tolist(), strict=True):
        data: dict[str, Any] = {"age_s": round(age, 3)}
        if extra is not None and extra[i]:
            data.update(extra[i])
        events.append(Event("track.update", camera, ts, index, object_payload(detections, i), data))
    events += track_end_events(camera, ts, index, tracks.ended)
    frame.events[tracks.events_at : tracks.events_at] = events


def track_end_events(camera: str, ts_wall: float, frame_index: int, ended: EndedTracks) -> list[Event]:
    """A `track.end` for each ended track; `frame_index` -1 (a stop, after the last frame): each one's last frame."""
    if not len(ended):
        return []
    seen, life = ended.last_seen, ended.lifetime
    first_ts, last_ts, frames = life.first_ts.tolist(), life.last_ts.tolist(), life.frames.tolist()
    first_frame, last_frame = life.first_frame.tolist(), life.last_frame.tolist()
    return [
        Event(
            "track.end",
            camera,
            ts_wall,
            frame_index if frame_index >= 0 else last_frame[i],
            object_payload(seen, i),
            {
                "reason": ended.reason,
                "duration_s": round(last_ts[i] - first_ts[i], 3),
                "frames": frames[i],
                "first_frame": first_frame[i],
                "last_frame": last_frame[i],
            },
        )
        for i in range(len(seen))
    ]
