"""What the daemon and a camera's recorder say to each other about clips (docs/recording.md): orders down, reports
up. Plain pickled dataclasses, so that they travel to and from capture workers as they are."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


@dataclass(frozen=True, slots=True)
class RecorderSettings:
    """What a camera's capture needs to record: how much encoded stream to keep, where files go."""

    root: Path
    """The recordings root; every path in an order is below it."""
    pre_s: float
    encode_kbps: int
    """Raw sources: the bit rate of the H.264 encoded for recording."""
    segment_s: float | None = None
    """Continuous segments of this length (None: event clips only)."""


@dataclass(frozen=True, slots=True)
class ClipOrder:
    """Write (or extend) clip `clip_id`: from the keyframe at or before `start_ts` up to `end_ts` (wall clock, as
    events' `ts`), at most `max_s` seconds; a second order with the same id moves its end."""

    clip_id: str
    path: str
    """Relative to the recordings root (checked to stay below it)."""
    start_ts: float
    end_ts: float
    max_s: float


class ClipState(StrEnum):
    WRITING = "writing"
    """The first frame went to the file (`start_ts` is the first frame's)."""
    SAVED = "saved"
    DROPPED = "dropped"
    """Nothing playable was kept; `reason` says why."""


@dataclass(frozen=True, slots=True)
class ClipReport:
    clip_id: str
    camera: str
    state: ClipState
    path: str
    """Relative to the recordings root: where the file is (or would have been)."""
    start_ts: float | None = None
    end_ts: float | None = None
    frames: int = 0
    bytes: int = 0
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    reason: str = ""
    """Why it ended: `done` (its window passed), `max_s`, `stream_ended` (the camera dropped or the file ended),
    `format_changed` (codec or resolution), `stopped` (the daemon stopped), `disk_full`, `no_keyframe`, `error`."""
    error: str | None = None
    segment: bool = False
    """A continuous segment, not an event clip."""
    detail: dict[str, object] = field(default_factory=dict)
