"""Cameras captured in worker processes, as the daemon sees them: a `RemoteCapture` stands for a camera in the
daemon's capture set and keeps its counters across worker restarts; a `Doorbell` wakes a worker's waiting captures
when the daemon takes or lets go of a frame (vigild.capture.pool has the workers themselves)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from vigild.capture import shm
from vigild.capture.camera import CameraState, CameraStats
from vigild.capture.clips import ClipOrder, RecorderSettings
from vigild.capture.exchange import Notice, NoticeKind
from vigild.capture.messages import AddCapture, RecordClip
from vigild.config.backends import BackendUnavailable, camera_backend
from vigild.config.settings import CameraConfig
from vigild.config.sources import SourceSpec
from vigild.frame import Frame
from vigild.gstreamer import resolve_backend

if TYPE_CHECKING:
    from vigild.capture.pool import WorkerHandle

log = logging.getLogger("vigild.capture")

_ONE = (1).to_bytes(8, sys.byteorder)


class Doorbell:
    """An eventfd the daemon writes to wake a worker's waiting captures; safe to ring after it is closed (a frame
    let go of after its worker died), which does nothing, never a write to whatever reused the number."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # reentrant: a garbage collection inside `ring` may free a frame of the same worker, whose finalizer rings
        self._lock = threading.RLock()
        self._closed = False

    def ring(self) -> None:
        with self._lock:
            if not self._closed:
                # OSError: the counter is full, and the worker has plenty of wake-ups waiting
                with contextlib.suppress(OSError):
                    os.write(self.fd, _ONE)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)


def release(states: np.ndarray, slot: int, bell: Doorbell) -> None:
    """The last reference to a frame's image went: its slot is the worker's again."""
    states[slot] = shm.FREE
    bell.ring()


def taken(states: np.ndarray, slot: int, bell: Doorbell) -> None:
    """The scheduler took the frame: a worker waiting for its consumer sends the next one."""
    if states[slot] == shm.SENT:
        states[slot] = shm.TAKEN
        bell.ring()


class RemoteCapture:
    """A camera captured in a worker process, driven like a `CameraCapture` (the `Capture` protocol)."""

    def __init__(self, handle: WorkerHandle, capture_id: int, name: str, config: CameraConfig, spec: SourceSpec,
                 recording: RecorderSettings | None = None):  # fmt: skip
        self.recording = recording
        self.handle = handle
        self.capture_id = capture_id
        self.name = name
        self.config = config
        self.spec = spec
        try:
            backend = camera_backend(config, spec.kind)
        except BackendUnavailable:
            backend = resolve_backend(config.backend)
        self.stats = CameraStats(backend=backend)
        self.wait_for_consumer = not spec.is_live and not config.realtime
        self.next_index = 0
        self.streaming = False
        """Its last notice was `up`."""
        self.down_reported = False
        self.stopping = False
        self.segment: shm.Segment | None = None
        self._started = False
        self._done = threading.Event()
        self._base = [0, 0, 0, 0]
        """Counters of the workers that died under it (decoded, drops, decode errors, reconnects)."""
        self._last = [0, 0, 0, 0]

    # ----- the Capture protocol

    @property
    def worker(self) -> int:
        return self.handle.index

    def start(self) -> None:
        self._started = True
        self.handle.add(self)

    def stop(self) -> None:
        self.handle.remove(self)

    def join(self, timeout: float | None = None) -> None:
        if self._started:
            self._done.wait(timeout)

    def is_alive(self) -> bool:
        return self._started and not self._done.is_set()

    # ----- from the worker (its handle's thread)

    def add_message(self) -> AddCapture:
        return AddCapture(self.capture_id, self.name, self.config, self.spec, self.next_index, self.down_reported,
                          self.recording)  # fmt: skip

    def record(self, order: ClipOrder) -> None:
        self.handle.record(RecordClip(self.capture_id, order))

    def update(self, state: str, since: float, decoded: int, drops: int, errors: int, reconnects: int,
               last_error: str | None, fps: float | None, backend: str, decoder: str | None) -> None:  # fmt: skip
        stats, base = self.stats, self._base
        self._last = [decoded, drops, errors, reconnects]
        stats.state, stats.state_since = CameraState(state), since
        stats.frames_decoded, stats.source_drops = base[0] + decoded, base[1] + drops
        stats.decode_errors, stats.reconnects = base[2] + errors, base[3] + reconnects
        stats.last_error, stats.source_fps, stats.backend, stats.decoder = last_error, fps, backend, decoder

    def noticed(self, kind: NoticeKind) -> None:
        self.streaming = kind is NoticeKind.UP
        self.down_reported = kind is NoticeKind.DOWN

    def worker_died(self, how: str) -> Notice | None:
        """Its worker died: the counters carry over to the next one; the `down` to send, if it was streaming."""
        self._base = [b + last for b, last in zip(self._base, self._last, strict=True)]
        self._last = [0, 0, 0, 0]
        self.segment = None
        stats = self.stats
        stats.last_error = f"capture worker died ({how})"
        stats.state, stats.state_since = CameraState.BACKOFF, time.monotonic()
        self._base[3] += 1  # the restart counts as a reconnect
        stats.reconnects = self._base[3]
        if not self.streaming:
            return None
        self.streaming, self.down_reported = False, True
        detail: dict[str, object] = {"reason": "worker_died", "error": stats.last_error}
        return Notice(self.name, NoticeKind.DOWN, time.time(), self.next_index - 1, detail)

    def deliver(
        self,
        bell: Doorbell,
        name: str,
        slots: int,
        shape: tuple[int, int, int],
        slot: int,
        index: int,
        ts_wall: float,
        ts_mono: float,
        pts_ms: float | None,
    ) -> None:
        """A `frame` message of its worker: the frame, its image a view of the slot, into the exchange."""
        handle = self.handle
        segment = self.segment
        if segment is None or segment.name != name:
            try:
                prefix = shm.worker_prefix(handle.pool.instance, handle.index, handle.generation)
                segment = shm.Segment.attach(name, shape, slots, prefix)
            except FileNotFoundError:  # its capture stopped and the worker let go of it: the frame is void anyway
                return
            except ValueError as exc:  # not what a worker of ours sends: nothing of it is mapped or touched
                log.error("capture worker %d: refused frame memory for camera %s: %s", handle.index, self.name, exc)
                return
            except OSError as exc:  # no descriptors or memory left: the frame is lost, its slot goes back
                log.error("camera %s: cannot map frame memory %s: %s", self.name, name, exc)
                handle._send(("free", name, slot))
                return
            self.segment = segment  # frames of the one before keep their mapping for as long as they live
        try:
            lease = segment.lease(slot)
        except ValueError as exc:
            log.error("capture worker %d: camera %s: %s", handle.index, self.name, exc)
            return
        weakref.finalize(lease, release, segment.states, slot, bell)
        frame = Frame(self.name, index, ts_wall, ts_mono, np.asarray(lease), pts_ms)
        on_taken = partial(taken, segment.states, slot, bell) if self.wait_for_consumer else None
        self.next_index = index + 1
        if handle.pool.exchange.put(frame, on_taken=on_taken):
            self.stats.frames_delivered += 1

    def ended(self) -> None:
        if self.stats.state not in (CameraState.ENDED, CameraState.STOPPED):
            self.stats.state = CameraState.STOPPED
        self._done.set()
