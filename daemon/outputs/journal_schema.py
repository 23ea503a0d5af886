"""What the journal stores: its tables (`SCHEMA`) and one event as a row (`Record`), made from what the bus
stamped without parsing the wire JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vigild.outputs.bus import Stamped

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    run TEXT NOT NULL,
    ts REAL NOT NULL,
    camera TEXT NOT NULL,
    type TEXT NOT NULL,
    track INTEGER,
    label TEXT,
    body TEXT NOT NULL,
    snapshot TEXT,
    snapshot_bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_camera_ts ON events (camera, ts);
CREATE INDEX IF NOT EXISTS events_camera_type_ts ON events (camera, type, ts);
CREATE INDEX IF NOT EXISTS events_type_ts ON events (type, ts);
CREATE INDEX IF NOT EXISTS events_track ON events (camera, track) WHERE track IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_label ON events (label) WHERE label IS NOT NULL;
CREATE TABLE IF NOT EXISTS output_cursors (output TEXT PRIMARY KEY, seq INTEGER NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS clips (
    id TEXT PRIMARY KEY,
    camera TEXT NOT NULL,
    root TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    segment INTEGER NOT NULL DEFAULT 0,
    run TEXT NOT NULL,
    created REAL NOT NULL,
    retain_until REAL NOT NULL,
    start_ts REAL,
    end_ts REAL,
    frames INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    codec TEXT,
    width INTEGER,
    height INTEGER,
    reason TEXT,
    error TEXT,
    ref INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS clips_camera_start ON clips (camera, start_ts);
CREATE INDEX IF NOT EXISTS clips_state ON clips (state, created);
CREATE TABLE IF NOT EXISTS clip_events (
    clip TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    role TEXT NOT NULL,
    PRIMARY KEY (clip, seq)
);
CREATE INDEX IF NOT EXISTS clip_events_seq ON clip_events (seq);
CREATE INDEX IF NOT EXISTS clip_events_id ON clip_events (event_id);
"""
"""`clips` and `clip_events`: the recordings' side tables (docs/recording.md), written by vigild.recording. A clip
row is every clip ever ordered, with its state (`pending`, `writing`, `saved`, `dropped`, `expired`); `clip_events`
links it to the events that started (`start`) or extended (`extend`) it. A continuous segment is a row with
`segment` 1; an event clip of a camera recorded continuously is a reference into its segments (`ref` 1, no file of
its own until it is exported, or kept longer than the segments it refers to). Events themselves are never changed: an
event's clip is found through this table."""


@dataclass(frozen=True)
class Record:
    """One event as the journal stores it: its wire JSON as published (`body`), the columns queries filter on, and
    its snapshot's JPEG, if it has one. Made from the event the bus stamped (`from_stamped`): the journal never
    parses the JSON it stores."""

    seq: int
    id: str
    run: str
    ts: float
    camera: str
    type: str
    body: bytes
    track: int | None = None
    label: str | None = None
    jpeg: bytes | None = None

    @classmethod
    def from_stamped(cls, item: Stamped) -> Record:
        """ValueError when the event's JSON cannot be built."""
        event, obj = item.event, item.event.object or {}
        track, label = obj.get("track_id"), obj.get("label")
        return cls(item.seq, item.id, item.run, event.ts_wall, event.camera, event.type, item.wire(),
                   track if isinstance(track, int) else None, label if isinstance(label, str) else None,
                   event.snapshot.jpeg if event.snapshot is not None else None)  # fmt: skip
