"""What the daemon and its capture workers say to each other (vigild.capture.pool, vigild.capture.worker), over the
socket vigild.children gives them: typed, pickled dataclasses. Here, not in worker.py, because the worker runs as
`__main__`: a class it defined would pickle under that name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vigild.capture.clips import ClipOrder, ClipReport, RecorderSettings
from vigild.config.settings import CameraConfig
from vigild.config.sources import SourceSpec


@dataclass(frozen=True, slots=True)
class WorkerHello:
    """The first message to a worker: who it is."""

    instance: str
    worker: int
    generation: int
    slots: int
    log_level: str
    cv2_threads: int


# ----- daemon → worker (and `vigild.children.Stop`: stop the captures and exit)


@dataclass(frozen=True, slots=True)
class AddCapture:
    capture_id: int
    name: str
    config: CameraConfig
    spec: SourceSpec
    first_index: int
    down_reported: bool
    recording: RecorderSettings | None = None


@dataclass(frozen=True, slots=True)
class RecordClip:
    """Write or extend a clip of the capture (vigild.capture.recorder)."""

    capture_id: int
    order: ClipOrder


@dataclass(frozen=True, slots=True)
class RemoveCapture:
    capture_id: int


@dataclass(frozen=True, slots=True)
class FreeSlot:
    """The daemon could not map a frame it was sent: its slot is the worker's again."""

    segment: str
    slot: int


# ----- worker → daemon


@dataclass(frozen=True, slots=True)
class FrameReady:
    """A frame in slot `slot` of shared-memory segment `segment` (of `slots` slots of `shape`)."""

    capture_id: int
    segment: str
    slots: int
    shape: tuple[int, int, int]
    slot: int
    index: int
    ts_wall: float
    ts_mono: float
    pts_ms: float | None


@dataclass(frozen=True, slots=True)
class CaptureStats:
    capture_id: int
    state: str
    since: float
    decoded: int
    drops: int
    errors: int
    reconnects: int
    last_error: str | None
    fps: float | None
    backend: str
    decoder: str | None


@dataclass(frozen=True, slots=True)
class CaptureNotice:
    capture_id: int
    kind: str
    ts_wall: float
    frame_index: int
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClipDone:
    """A clip of the capture started, was saved or dropped."""

    capture_id: int
    report: ClipReport


@dataclass(frozen=True, slots=True)
class CaptureStopped:
    """Its capture thread ended: the segments it made, for the daemon to unlink once it has read their frames."""

    capture_id: int
    segments: list[str]


@dataclass(frozen=True, slots=True)
class Alive:
    """A worker without cameras says it lives (the daemon kills one that says nothing for a while)."""
