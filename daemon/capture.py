"""One thread per camera: open the source, read frames, pace and resize them, hand them to the exchange.

A source that cannot be opened or fails while streaming is reopened with exponential backoff, forever, without
touching any other camera. A file that reaches its end either loops or ends the camera.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

import cv2
import numpy as np

from vigild.config import CameraConfig
from vigild.exchange import FrameExchange, Notice, NoticeKind
from vigild.frame import Frame

log = logging.getLogger("vigild.capture")

_URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


class CameraState(StrEnum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    BACKOFF = "backoff"
    ENDED = "ended"
    STOPPED = "stopped"


@dataclass
class CameraStats:
    """Counters the heartbeat reports; written by the capture thread only."""

    state: CameraState = CameraState.CONNECTING
    frames_read: int = 0
    frames_delivered: int = 0
    reconnects: int = 0
    read_errors: int = 0
    last_error: str | None = None
    source_fps: float | None = None
    state_since: float = field(default_factory=time.monotonic)


def is_file_source(source: str) -> bool:
    return not source.startswith(_URL_SCHEMES) and not source.isdigit() and not source.startswith("/dev/video")


def open_source(source: str) -> cv2.VideoCapture:
    if source.isdigit():
        return cv2.VideoCapture(int(source))
    return cv2.VideoCapture(source, cv2.CAP_FFMPEG)


class CameraCapture:
    def __init__(self, name: str, config: CameraConfig, exchange: FrameExchange):
        self.name = name
        self.config = config
        self.exchange = exchange
        self.stats = CameraStats()
        self.is_file = is_file_source(config.source)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture-{name}", daemon=True)
        self._index = 0
        self._down_reported = False  # a `down` was sent and no `up` since: one report per outage

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _set_state(self, state: CameraState) -> None:
        self.stats.state = state
        self.stats.state_since = time.monotonic()

    def _notify(self, kind: NoticeKind, frame_index: int | None = None, **detail: object) -> None:
        """`frame_index`: the frame the notice refers to; by default the last one read (-1 before any)."""
        index = self._index - 1 if frame_index is None else frame_index
        self._down_reported = kind is not NoticeKind.UP
        self.exchange.notify(Notice(self.name, kind, time.time(), index, detail))

    def _run(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                self._set_state(CameraState.CONNECTING)
                try:
                    outcome = self._stream_once()
                except Exception as exc:  # a bug or an odd source: count it as a failure and retry like any other
                    log.exception("camera %s: capture failed", self.name)
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                    outcome = "failed"
                if outcome == "ended" or self._stop.is_set():
                    break
                failures = 0 if outcome == "streamed" else failures + 1
                if not self._down_reported:  # once per outage, not on every retry
                    self._notify(NoticeKind.DOWN, reason="unavailable", error=self.stats.last_error)
                self.stats.reconnects += 1
                delay = min(
                    self.config.reconnect.max_delay, self.config.reconnect.initial_delay * 2 ** max(failures - 1, 0)
                )
                delay *= 1 + random.uniform(0, self.config.reconnect.jitter)
                log.warning("camera %s: %s; retrying in %.1f s", self.name, self.stats.last_error, delay)
                self._set_state(CameraState.BACKOFF)
                self._stop.wait(delay)
        finally:
            if self.stats.state is not CameraState.ENDED:  # a file that ended stays `ended`, even once stopped
                self._set_state(CameraState.STOPPED if self._stop.is_set() else CameraState.ENDED)

    def _stream_once(self) -> str:
        """Open the source and stream until it fails ('failed'/'streamed'), ends ('ended') or we stop ('stopped')."""
        source = self.config.source
        if self.is_file and not os.path.exists(source):
            self.stats.last_error = f"source not found: {source}"
            return "failed"
        capture = open_source(source)
        try:
            if not capture.isOpened():
                self.stats.last_error = f"cannot open source {source}"
                return "failed"
            fps = capture.get(cv2.CAP_PROP_FPS)
            self.stats.source_fps = fps if fps and 0 < fps < 1000 else None
            return self._read_loop(capture)
        finally:
            capture.release()

    def _read_loop(self, capture: cv2.VideoCapture) -> str:
        config = self.config
        min_interval = 1.0 / config.fps if config.fps else 0.0
        pace = self.is_file and config.realtime and self.stats.source_fps is not None
        wait_for_consumer = self.is_file and not config.realtime
        announced = False
        started = time.monotonic()
        read_in_pass = 0
        next_due = 0.0  # stream time (seconds) at which the next frame may be delivered under the fps limit
        while not self._stop.is_set():
            ok, image = capture.read()
            if not ok or image is None:
                if self.is_file and read_in_pass > 0:
                    if config.loop:
                        capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                        started, read_in_pass, next_due = time.monotonic(), 0, 0.0
                        continue
                    self._set_state(CameraState.ENDED)
                    self._notify(NoticeKind.ENDED, reason="end_of_stream")
                    return "ended"
                self.stats.read_errors += 1
                self.stats.last_error = (
                    "no frame from source" if announced else f"source {config.source} gives no frames"
                )
                if announced:
                    self._notify(NoticeKind.DOWN, reason="error", error=self.stats.last_error)
                return "streamed" if announced else "failed"
            ts_wall, ts_mono = time.time(), time.monotonic()
            index = self._index
            self._index += 1
            self.stats.frames_read += 1
            read_in_pass += 1
            pts_ms = capture.get(cv2.CAP_PROP_POS_MSEC) if self.is_file else None
            stream_time = pts_ms / 1000.0 if pts_ms is not None else ts_mono - started
            if min_interval:
                if stream_time + 1e-6 < next_due:
                    continue
                next_due = max(next_due + min_interval, stream_time)
            if not announced:
                height, width = image.shape[:2]
                self._set_state(CameraState.STREAMING)
                self._notify(
                    NoticeKind.UP, index, source=config.source, width=width, height=height, fps=self.stats.source_fps
                )
                announced = True
            if pace:
                delay = started + stream_time - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                ts_wall, ts_mono = time.time(), time.monotonic()
            if config.resize is not None:
                image = cv2.resize(image, config.resize, interpolation=cv2.INTER_AREA)
            frame = Frame(self.name, index, ts_wall, ts_mono, np.ascontiguousarray(image), pts_ms)
            if not self.exchange.put(frame, wait=wait_for_consumer):
                break
            self.stats.frames_delivered += 1
        return "stopped"
