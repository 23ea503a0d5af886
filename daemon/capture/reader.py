"""The interface between a camera's capture thread and a capture back end (GStreamer or OpenCV).

A reader opens one connection to a source and hands out decoded frames; the capture thread owns everything
that outlives a connection (reconnects, backoff, the stall watchdog, notices, counters). A reader is used once:
a reconnect builds a new one, so nothing of a broken connection can leak into the next.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from vigild.config.settings import CameraConfig
from vigild.config.sources import SourceKind, SourceSpec


class SourceError(Exception):
    """The source failed (cannot open, connection lost, decoder error); the message says why, for the user."""

    def __init__(self, message: str, *, hardware_decoder: str | None = None):
        super().__init__(message)
        self.hardware_decoder = hardware_decoder
        """Set when the error came from a hardware decoder: the next attempt decodes in software."""


class SourceStalled(SourceError):
    """The back end itself waited `stall_timeout` for a frame (OpenCV's FFmpeg read timeout)."""


class EndOfStream(Exception):
    """The source has no more frames (a file's end; a live stream the server ended)."""


@dataclass(frozen=True)
class RawFrame:
    image: np.ndarray
    """BGR uint8 (H, W, 3); may be read-only."""
    ts_wall: float
    """Capture time, UNIX seconds (docs/capture.md says what that is for each kind of source)."""
    ts_mono: float
    """The same instant on this machine's monotonic clock, for latency."""
    pts_ms: float | None
    """The stream's presentation timestamp, where it has one."""


@dataclass
class ReaderCounters:
    decoded: int = 0
    """Frames that reached the end of the back end's pipeline."""
    dropped: int = 0
    """Of those, frames replaced by a newer one before the capture thread took them."""
    decode_errors: int = 0


class FrameReader(ABC):
    backend: str
    decoder: str | None = None
    """The decoder element in use, once known (after the first frame)."""
    hardware_decoder: str | None = None
    """The hardware decoder plugged into this connection, as soon as it is (before any frame comes out of it)."""

    def __init__(self, camera: str, config: CameraConfig, spec: SourceSpec, *, software_only: bool = False):
        self.camera = camera
        self.config = config
        self.spec = spec
        self.software_only = software_only or config.decoder == "software"
        self.counters = ReaderCounters()
        self.source_fps: float | None = None

    @abstractmethod
    def open(self) -> None:
        """Start connecting; raise `SourceError` if that fails at once. Frames may take a while to come."""

    @abstractmethod
    def read(self, timeout: float) -> RawFrame | None:
        """The next frame, or None if none came within `timeout` seconds.

        Raises `EndOfStream` at the end of a file or stream, `SourceError` when the source fails.
        """

    @abstractmethod
    def rewind(self) -> None:
        """Files only: go back to the first frame (for `loop: true`)."""

    @abstractmethod
    def close(self) -> None:
        """Release everything the connection holds (threads, sockets, decoders). Safe to call twice."""


def check_local_source(spec: SourceSpec) -> None:
    """A missing file or device is reported plainly, before any back end turns it into a generic error."""
    if spec.kind is SourceKind.FILE and not os.path.isfile(spec.uri):
        raise SourceError(f"file not found: {spec.uri}")
    if spec.kind is SourceKind.V4L2 and not os.path.exists(spec.uri):
        raise SourceError(f"no such device: {spec.uri} (is the camera plugged in?)")
