"""One thread per camera: connect through a back end (GStreamer or OpenCV), hand frames to the exchange.

A source that cannot be opened, fails while streaming, ends (a live one) or sends no frame for `stall_timeout`
seconds is torn down and reopened with exponential backoff, forever, without touching any other camera. A file
that reaches its end either loops or ends the camera. Each connection gets a new reader, closed before the next
one opens, so a long run of reconnects leaves no threads, sockets or decoders behind.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from vigild.capture.clips import ClipOrder, ClipReport, ClipState, RecorderSettings
from vigild.capture.exchange import Notice, NoticeKind
from vigild.capture.reader import EndOfStream, FrameReader, ReaderCounters, SourceError, SourceStalled
from vigild.config.backends import BackendUnavailable, camera_backend
from vigild.config.settings import CameraConfig
from vigild.config.sources import SourceSpec, redact
from vigild.frame import Frame
from vigild.gstreamer import resolve_backend
from vigild.lifecycle import ServiceThread

log = logging.getLogger("vigild.capture")

READ_POLL_S = 0.2
"""How often the capture thread wakes while waiting for a frame, to notice `stop` and stalls."""


class CameraState(StrEnum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    STALLED = "stalled"
    BACKOFF = "backoff"
    ENDED = "ended"
    STOPPED = "stopped"


@dataclass
class CameraStats:
    """Counters the heartbeat reports; written by the capture thread only."""

    state: CameraState = CameraState.CONNECTING
    frames_decoded: int = 0
    """Frames the source delivered (after the `fps` limit), over all connections."""
    frames_delivered: int = 0
    """Frames handed to the exchange."""
    source_drops: int = 0
    """Frames the back end replaced by a newer one before the capture thread took them."""
    decode_errors: int = 0
    reconnects: int = 0
    last_error: str | None = None
    source_fps: float | None = None
    backend: str = ""
    decoder: str | None = None
    state_since: float = field(default_factory=time.monotonic)
    _closed_counters: ReaderCounters = field(default_factory=ReaderCounters)
    """Sums over the connections already closed; the open one's are added live."""

    def update_from(self, current: ReaderCounters | None) -> None:
        closed = self._closed_counters
        self.frames_decoded = closed.decoded + (current.decoded if current else 0)
        self.source_drops = closed.dropped + (current.dropped if current else 0)
        self.decode_errors = closed.decode_errors + (current.decode_errors if current else 0)

    def close_connection(self, counters: ReaderCounters) -> None:
        self._closed_counters.decoded += counters.decoded
        self._closed_counters.dropped += counters.dropped
        self._closed_counters.decode_errors += counters.decode_errors
        self.update_from(None)



class FrameSink(Protocol):
    """Where a capture thread hands its frames and notices: the daemon's `FrameExchange`, or a capture worker's
    shared-memory link to it (vigild.capture.worker)."""

    def put(self, frame: Frame, wait: bool = False) -> bool:
        """Offer `frame`; with `wait`, block until the previous one was taken. False: stop capturing."""
        ...

    def notify(self, notice: Notice) -> None: ...

    def clip(self, report: ClipReport) -> None:
        """A clip of this camera started, was saved or was dropped (vigild.capture.recorder); must not block."""
        ...


class Capture(Protocol):
    """One camera's capture as the service drives it: a thread here (`CameraCapture`) or in a capture worker
    (`vigild.capture.pool.RemoteCapture`)."""

    name: str
    stats: CameraStats

    @property
    def worker(self) -> int | None:
        """The capture worker serving it (None: a thread in the daemon)."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...

    def record(self, order: ClipOrder) -> None:
        """Write (or extend) a clip (docs/recording.md); its result comes back through the exchange."""
        ...


def make_reader(
    camera: str, config: CameraConfig, spec: SourceSpec, backend: str, *, software_only: bool = False,
    recorder: Any = None,
) -> FrameReader:
    """`backend`: a resolved name, `gstreamer` or `opencv` (the GStreamer one is imported only when used);
    `recorder`: the camera's `CameraRecorder`, which only the GStreamer back end feeds."""
    if backend == "gstreamer":
        from vigild.capture.reader_gst import GstReader

        return GstReader(camera, config, spec, software_only=software_only, recorder=recorder)
    from vigild.capture.reader_opencv import OpenCVReader

    return OpenCVReader(camera, config, spec, software_only=software_only)


class Outcome(StrEnum):
    ENDED = "ended"
    """A file reached its end (and does not loop): the camera is done."""
    STOPPED = "stopped"
    FAILED = "failed"
    """The connection never delivered a frame."""
    LOST = "lost"
    """The connection delivered frames, then failed, ended or stalled."""


class CameraCapture:
    worker: int | None = None

    def __init__(
        self,
        name: str,
        config: CameraConfig,
        spec: SourceSpec,
        exchange: FrameSink,
        *,
        first_index: int = 0,
        down_reported: bool = False,
        recording: RecorderSettings | None = None,
    ):
        """`first_index`, `down_reported`: where a capture restarted in a new worker process takes over (its frame
        numbers go on; a `down` already sent for the outage is not sent again); `recording`: keep the encoded
        stream and write clips (docs/recording.md)."""
        self.name = name
        self.config = config
        self.spec = spec
        self.exchange = exchange
        self._unavailable: str | None = None
        """Why this machine cannot capture the camera with its back end (the check before a change let it through:
        a reload): every connection fails with this, and the camera reports it."""
        try:
            self.backend = camera_backend(config, spec.kind)
        except BackendUnavailable as exc:
            self.backend, self._unavailable = resolve_backend(config.backend), str(exc)
        self.stats = CameraStats(backend=self.backend)
        self._stop = threading.Event()
        self._thread = ServiceThread(f"capture-{name}", self._run)
        self._index = first_index
        self._down_reported = down_reported  # a `down` was sent and no `up` since: one report per outage
        self._software_only = False  # set after a hardware decoder failed: later connections decode in software
        self._retry_now = False  # the hardware decoder just failed: reconnect in software at once, no backoff
        self._frame_size: tuple[int, ...] = (0, 0)  # (height, width) of the last frame delivered
        self.recorder: Any = None
        if recording is not None and self.backend == "gstreamer" and self._unavailable is None:
            from vigild.capture.recorder import CameraRecorder  # GStreamer: only where a camera records

            self.recorder = CameraRecorder(name, recording, exchange.clip)

    def record(self, order: ClipOrder) -> None:
        if self.recorder is None:
            why = "this camera is not recorded here (recording needs the GStreamer back end)"
            self.exchange.clip(ClipReport(order.clip_id, self.name, ClipState.DROPPED, order.path, reason="error",
                                          error=why))  # fmt: skip
            return
        self.recorder.order(order)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.stop(timeout)

    def is_alive(self) -> bool:
        return self._thread.alive

    def _set_state(self, state: CameraState) -> None:
        self.stats.state = state
        self.stats.state_since = time.monotonic()

    def _notify(self, kind: NoticeKind, frame_index: int | None = None, **detail: object) -> None:
        """`frame_index`: the frame the notice refers to; by default the last one read (-1 before any)."""
        index = self._index - 1 if frame_index is None else frame_index
        self._down_reported = kind is not NoticeKind.UP
        self.exchange.notify(Notice(self.name, kind, time.time(), index, detail))

    def _run(self, thread: ServiceThread) -> None:
        thread.ready()
        failures = 0
        try:
            while not self._stop.is_set():
                self._set_state(CameraState.CONNECTING)
                try:
                    outcome = self._connect_once()
                except Exception as exc:  # a bug or an odd source: count it as a failure and retry like any other
                    log.exception("camera %s: capture failed", self.name)
                    self.stats.last_error = self._masked(f"{type(exc).__name__}: {exc}")
                    outcome = self._lost("error") if self.stats.state is CameraState.STREAMING else Outcome.FAILED
                if outcome is Outcome.ENDED or self._stop.is_set():
                    break
                if self._retry_now:  # once per camera: the same source, decoded in software
                    self._retry_now = False
                    self.stats.reconnects += 1
                    continue
                failures = 0 if outcome is Outcome.LOST else failures + 1
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
            if self.recorder is not None:  # the clips being written are finished and saved before we end
                self.recorder.close()
            if self.stats.state is not CameraState.ENDED:  # a file that ended stays `ended`, even once stopped
                self._set_state(CameraState.STOPPED if self._stop.is_set() else CameraState.ENDED)

    def _connect_once(self) -> Outcome:
        """One connection: open, stream until it fails, ends, stalls or we stop; always closed on return."""
        if self._unavailable is not None:
            self.stats.last_error = self._unavailable
            return Outcome.FAILED
        reader = make_reader(self.name, self.config, self.spec, self.backend, software_only=self._software_only,
                             recorder=self.recorder)  # fmt: skip
        try:
            reader.open()
            return self._stream(reader)
        except SourceError as exc:
            self.stats.last_error = self._masked(str(exc))
            if exc.hardware_decoder and not self._software_only:
                log.warning(
                    "camera %s: hardware decoder %s failed; decoding in software from now on",
                    self.name,
                    exc.hardware_decoder,
                )
                self._software_only = True
                self._retry_now = True
            was_streaming = self.stats.state is CameraState.STREAMING
            if isinstance(exc, SourceStalled):
                self._set_state(CameraState.STALLED)
                return self._lost("stalled") if was_streaming else Outcome.FAILED
            return self._lost("error") if was_streaming else Outcome.FAILED
        finally:
            if self.recorder is not None and self._stop.is_set():  # the clips end because we stop, not the stream
                self.recorder.discontinuity("stopped")
            reader.close()
            self.stats.close_connection(reader.counters)

    def _masked(self, text: str) -> str:
        """Error texts from back ends may quote the URI they opened, credentials included."""
        password = self.config.password.get_secret_value() if self.config.password else ""
        return redact(text, (password,))

    def _lost(self, reason: str) -> Outcome:
        self._notify(NoticeKind.DOWN, reason=reason, error=self.stats.last_error)
        return Outcome.LOST

    def _stream(self, reader: FrameReader) -> Outcome:
        config = self.config
        wait_for_consumer = not self.spec.is_live and not config.realtime
        stats = self.stats
        last_progress = time.monotonic()
        last_decoded = 0
        while not self._stop.is_set():
            try:
                raw = reader.read(min(READ_POLL_S, config.stall_timeout))
            except EndOfStream:
                if self.spec.is_live:
                    stats.last_error = "the source ended the stream"
                    return self._lost("end_of_stream") if stats.state is CameraState.STREAMING else Outcome.FAILED
                if config.loop and stats.frames_delivered > 0:
                    reader.rewind()
                    continue
                self._set_state(CameraState.ENDED)
                self._notify(NoticeKind.ENDED, reason="end_of_stream")
                return Outcome.ENDED
            stats.update_from(reader.counters)
            now = time.monotonic()
            if raw is None:
                if reader.counters.decoded != last_decoded:  # frames still arrive (skipped by the fps limit)
                    last_decoded, last_progress = reader.counters.decoded, now
                elif now - last_progress > config.stall_timeout:
                    was_streaming = stats.state is CameraState.STREAMING
                    stats.last_error = f"no frame for {config.stall_timeout:g} s"
                    if reader.hardware_decoder and reader.counters.decoded == 0:
                        # data reached a hardware decoder and no frame ever came out of it (GPU-memory frames the
                        # pipeline could not take, a hung video engine): not the source's fault
                        stats.last_error += f" from hardware decoder {reader.hardware_decoder}"
                        raise SourceError(stats.last_error, hardware_decoder=reader.hardware_decoder)
                    self._set_state(CameraState.STALLED)
                    return self._lost("stalled") if was_streaming else Outcome.FAILED
                continue
            index = self._index
            self._index += 1
            size = raw.image.shape[:2]
            if stats.state is CameraState.STREAMING and size != self._frame_size:
                # the camera's own setting changed (or an ad break in a stream): frames go on at the new size
                log.info(
                    "camera %s: frame size changed from %dx%d to %dx%d at frame %d",
                    self.name, self._frame_size[1], self._frame_size[0], size[1], size[0], index,
                )
            self._frame_size = size
            if stats.state is not CameraState.STREAMING:
                height, width = raw.image.shape[:2]
                stats.source_fps, stats.decoder = reader.source_fps, reader.decoder
                self._set_state(CameraState.STREAMING)
                self._notify(
                    NoticeKind.UP,
                    index,
                    source=self.spec.display,
                    width=width,
                    height=height,
                    fps=stats.source_fps,
                    backend=reader.backend,
                    decoder=reader.decoder,
                )
                log.info(
                    "camera %s: streaming %dx%d from %s (%s, decoder %s)",
                    self.name,
                    width,
                    height,
                    self.spec.display,
                    reader.backend,
                    reader.decoder or "none: raw video",
                )
            frame = Frame(self.name, index, raw.ts_wall, raw.ts_mono, raw.image, raw.pts_ms)
            if not self.exchange.put(frame, wait=wait_for_consumer):
                break
            stats.frames_delivered += 1
            last_decoded, last_progress = reader.counters.decoded, time.monotonic()
        return Outcome.STOPPED
