"""The hand-over between capture threads and the scheduler: one latest-frame slot per camera.

A camera that is faster than the chain overwrites its unconsumed frame (the old one is dropped and counted)
instead of queueing it, so latency never grows. A file read "as fast as possible" waits for its slot to empty
instead, so benchmarks see every frame. Camera notices (up, down, ended) travel through the same place so the
scheduler handles them in order with the frames; they also tell how many cameras stream, which sizes a batch.
Capture's side of the hand-over, so it lives in capture: the pipeline above takes from it, capture never imports
the pipeline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from vigild.capture.clips import ClipReport
from vigild.frame import Frame

log = logging.getLogger("vigild.capture")


class NoticeKind(StrEnum):
    UP = "up"
    DOWN = "down"
    ENDED = "ended"


@dataclass(frozen=True)
class Notice:
    camera: str
    kind: NoticeKind
    ts_wall: float
    frame_index: int
    detail: dict[str, object]


@dataclass
class Taken:
    frames: list[Frame]
    opened: list[Notice]
    """`up` notices, to handle before the frames (they were posted before these frames were captured)."""
    closed: list[Notice]
    """`down`/`ended` notices of cameras with no frame left waiting: handle after the frames."""


class FrameExchange:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frames: dict[str, Frame] = {}
        self._notices: deque[Notice] = deque()
        self._closed = False
        self._retired: set[str] = set()
        self._streaming: set[str] = set()
        """Cameras whose last notice was `up` (posted as their capture starts streaming)."""
        self.drops: Counter[str] = Counter()
        self._on_taken: dict[str, Callable[[], None]] = {}
        self.clip_listener: Callable[[ClipReport], None] | None = None
        """Takes the recorders' clip reports (set by the daemon when a camera records)."""

    def put(self, frame: Frame, wait: bool = False, on_taken: Callable[[], None] | None = None) -> bool:
        """Offer `frame`; with `wait`, block until the previous one was taken. False once the exchange is closed.

        `on_taken` is called (on the taker's thread, outside the lock; it must not block) when the scheduler takes
        the frame: a capture worker waiting for its consumer learns so through it."""
        with self._cond:
            if wait:
                self._cond.wait_for(
                    lambda: frame.camera not in self._frames or self._closed or frame.camera in self._retired
                )
            if self._closed or frame.camera in self._retired:
                return False
            if frame.camera in self._frames:
                self.drops[frame.camera] += 1
            self._frames[frame.camera] = frame
            if on_taken is not None:
                self._on_taken[frame.camera] = on_taken
            else:
                self._on_taken.pop(frame.camera, None)
            self._cond.notify_all()
            return True

    def retire(self, camera: str) -> None:
        """Stop taking `camera`'s frames and notices (its capture is being stopped on purpose); drop what waits."""
        with self._cond:
            self._retired.add(camera)
            self._streaming.discard(camera)
            self._frames.pop(camera, None)
            self._on_taken.pop(camera, None)
            self._notices = deque(n for n in self._notices if n.camera != camera)
            self._cond.notify_all()

    def admit(self, camera: str) -> None:
        """Take `camera`'s frames again (a new capture of it is about to start)."""
        with self._cond:
            self._retired.discard(camera)

    def forget(self, camera: str) -> None:
        """Drop all that is kept for `camera` (removed, and its capture thread has ended), so that adding and
        removing cameras never grows this."""
        with self._cond:
            self._retired.discard(camera)
            self._streaming.discard(camera)
            self._frames.pop(camera, None)
            self._on_taken.pop(camera, None)
            self._notices = deque(n for n in self._notices if n.camera != camera)
            self.drops.pop(camera, None)
            self._cond.notify_all()

    def notify(self, notice: Notice) -> None:
        with self._cond:
            if notice.camera in self._retired:
                return
            if notice.kind is NoticeKind.UP:
                self._streaming.add(notice.camera)
            else:
                self._streaming.discard(notice.camera)
            self._notices.append(notice)
            self._cond.notify_all()

    def clip(self, report: ClipReport) -> None:
        """A camera's clip started, was saved or dropped: to whoever listens (the daemon's recording), at once,
        on the caller's thread (it must not block); before anyone listens, it is logged and forgotten."""
        listener = self.clip_listener
        if listener is not None:
            listener(report)
        else:
            log.warning("camera %s: clip %s %s with no one to tell", report.camera, report.clip_id, report.state.value)

    @property
    def waiting(self) -> int:
        """Frames waiting for the scheduler (at most one a camera)."""
        return len(self._frames)

    def streaming(self) -> int:
        """How many cameras stream now: their capture said `up`, and neither `down` nor `ended` since, nor was it
        stopped on purpose (`retire`)."""
        return len(self._streaming)

    def take(self, max_frames: int, max_wait: float, want: int, timeout: float) -> Taken:
        """Wait up to `timeout` for anything, then up to `max_wait` more until `want` frames are ready.

        Returns at most `max_frames` frames, oldest capture first; a camera left out keeps its frame for the
        next call.
        """
        callbacks: list[Callable[[], None]] = []
        taken = self._take(max_frames, max_wait, want, timeout, callbacks)
        for callback in callbacks:
            callback()
        return taken

    def _take(
        self, max_frames: int, max_wait: float, want: int, timeout: float, callbacks: list[Callable[[], None]]
    ) -> Taken:
        with self._cond:
            if not self._cond.wait_for(lambda: self._frames or self._notices or self._closed, timeout):
                return Taken([], [], [])
            if self._frames and len(self._frames) < want and max_wait > 0:
                deadline = time.monotonic() + max_wait
                self._cond.wait_for(
                    lambda: len(self._frames) >= want or self._closed, max(0.0, deadline - time.monotonic())
                )
            # a frame captured after its camera went down (it reconnected meanwhile) waits until the `down` is handled
            first_close: dict[str, int] = {}
            for notice in self._notices:
                if notice.kind is not NoticeKind.UP:
                    first_close.setdefault(notice.camera, notice.frame_index)
            ready = [
                frame
                for frame in sorted(self._frames.values(), key=lambda f: f.ts_mono)
                if frame.index <= first_close.get(frame.camera, frame.index)
            ][:max_frames]
            for frame in ready:
                del self._frames[frame.camera]
                callback = self._on_taken.pop(frame.camera, None) if self._on_taken else None
                if callback is not None:
                    callbacks.append(callback)
            opened: list[Notice] = []
            closed: list[Notice] = []
            kept: deque[Notice] = deque()
            blocked: set[str] = set()
            for notice in self._notices:
                # a notice waits while its camera has an older frame still pending, or an earlier notice waits
                pending = self._frames.get(notice.camera)
                if (pending is not None and pending.index <= notice.frame_index) or notice.camera in blocked:
                    blocked.add(notice.camera)
                    kept.append(notice)
                elif notice.kind is NoticeKind.UP:
                    opened.append(notice)
                else:
                    closed.append(notice)
                    blocked.add(notice.camera)  # a later `up` must wait for the next round, after this `down`
            self._notices = kept
            self._cond.notify_all()
            return Taken(ready, opened, closed)

    def close(self) -> None:
        """Wake everyone; later puts are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
