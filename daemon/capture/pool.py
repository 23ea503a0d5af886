"""Capture workers, daemon side: start them, give each camera to one, turn what they send into frames and notices
for the exchange, and restart a worker that dies without touching the others' cameras.

Each worker has one thread here (`WorkerHandle._supervise`) that reads its socket in order: a `frame` becomes a
`Frame` whose image is a read-only view of the worker's shared-memory slot (no copy; the slot goes back to the
worker when nothing refers to the image any more, see vigild.capture.shm), a `notice` goes to the exchange as the
capture thread's would, `stats` refresh the camera's counters. When the socket closes and the daemon is not
stopping, the worker died: its streaming cameras get `camera.down` with reason `worker_died` (frames already
received still go through the chain first), its segments are unlinked, and after a backoff a new worker takes over
its cameras, each going on from its next frame number; their `camera.up` comes with their first frame.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from vigild.capture import shm
from vigild.capture.clips import ClipReport, RecorderSettings
from vigild.capture.exchange import FrameExchange, Notice, NoticeKind
from vigild.capture.messages import (
    Alive,
    CaptureNotice,
    CaptureStats,
    CaptureStopped,
    ClipDone,
    FrameReady,
    RecordClip,
    RemoveCapture,
    WorkerHello,
)
from vigild.capture.remote import Doorbell, RemoteCapture
from vigild.children import Backoff, Child, ChildGone, Stop, describe_exit
from vigild.config.settings import CameraConfig
from vigild.config.sources import SourceSpec
from vigild.lifecycle import ServiceThread

__all__ = ["CaptureWorkers", "Doorbell", "RemoteCapture", "WorkerHandle", "auto_workers"]

log = logging.getLogger("vigild.capture")

RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 30.0
"""A worker that lived this long before dying restarts after the initial delay again."""
EXIT_WAIT_S = 2.0
SILENT_S = 15.0
"""A worker that sends nothing for this long (it sends counters every 0.25 s) is hung: it is killed and restarted
like one that died."""


def auto_workers(usable_cpus: int, cameras: int) -> int:
    """`capture.workers: auto`: threads in the daemon below 8 usable CPUs (measured: docs/performance.md), else one
    worker per 4 CPUs, at most one per camera and 16 in all."""
    if usable_cpus < 8:
        return 0
    return max(1, min(usable_cpus // 4, cameras, 16))


class WorkerHandle:
    """One worker process and the cameras it serves; restarts it when it dies."""

    def __init__(self, pool: CaptureWorkers, index: int):
        self.pool = pool
        self.index = index
        self.generation = 0
        self.captures: dict[int, RemoteCapture] = {}
        self.assigned: weakref.WeakSet[RemoteCapture] = weakref.WeakSet()
        """Made for this worker and not started yet; one that is never started (a change that failed) drops out."""
        self.restarts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        """Held while the capture set or the process changes: a camera added during a restart goes to the new one."""
        self._send_lock = threading.Lock()
        self._child: Child | None = None
        self._bell: Doorbell | None = None
        self._started_at = 0.0
        self._thread = ServiceThread(f"capture-worker-{index}", self._supervise)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def load(self) -> int:
        """Cameras it serves, and those given to it and not started yet (a daemon makes every capture first)."""
        return sum(not rc.stopping for rc in list(self.captures.values())) + len(self.assigned)

    def start(self) -> None:
        with self._lock:
            self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        """With `_lock` held: a new process (vigild.children: `python -P`, the daemon's sys.path), told who it is
        and given every camera this handle serves."""
        self.generation += 1
        bell = Doorbell()
        child = Child("vigild.capture.worker", args=(str(bell.fd),), pass_fds=(bell.fd,))
        pool = self.pool
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        try:
            child.spawn(WorkerHello(pool.instance, self.index, self.generation, pool.slots, level, pool.cv2_threads))
        except BaseException:
            bell.close()
            raise
        self._child, self.process, self._bell, self._started_at = child, child.process, bell, time.monotonic()
        try:
            for rc in self.captures.values():
                if not rc.stopping:
                    child.send(rc.add_message())
        except BaseException:  # (a camera that would not pickle): no half-told worker is left running
            child.kill()
            child.close()
            self._child = None
            bell.close()
            raise

    def _send(self, message: object) -> None:
        child = self._child
        if child is None:
            return
        with contextlib.suppress(ChildGone):  # it died: its thread sees the closed socket and restarts it
            child.send(message)

    def add(self, rc: RemoteCapture) -> None:
        with self._lock:
            self.assigned.discard(rc)
            self.captures[rc.capture_id] = rc
            self._send(rc.add_message())

    def remove(self, rc: RemoteCapture) -> None:
        with self._lock:
            rc.stopping = True
            if rc.capture_id not in self.captures:
                return
            if self._child is None:  # no worker now (it died, the next one is not started): nothing runs it
                del self.captures[rc.capture_id]
                rc.ended()
                return
            self._send(RemoveCapture(rc.capture_id))

    def record(self, message: RecordClip) -> None:
        """A clip order for one of its cameras (lost with the worker if it dies: the daemon's recording gives up
        on a clip it hears nothing of)."""
        with self._lock:
            self._send(message)

    def request_exit(self) -> None:
        """Ask the worker to exit (its captures were stopped)."""
        self._send(Stop())

    def stop(self, deadline: float) -> None:
        """Wait for the worker asked to exit until `deadline` (monotonic), kill it if it has not; close its ends."""
        process = self.process
        if process is not None:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("capture worker %d (pid %d) did not exit; killing it", self.index, process.pid)
                process.kill()
                process.wait()
        self._thread.stop(max(0.1, deadline - time.monotonic()))  # (its loop ends with the worker, asked above)
        with self._lock:
            child, self._child = self._child, None
            if child is not None:
                child.close()
            if self._bell is not None:
                self._bell.close()
            for rc in self.captures.values():
                rc.ended()
            self.captures.clear()

    # ----- the handle's thread

    def _supervise(self, thread: ServiceThread) -> None:
        """Read the worker's messages; when it dies, clean up after it and start the next one. Nothing that goes
        wrong in a cleanup or a start ends this thread: that would leave the worker's cameras without one."""
        thread.ready()  # (the first worker was started by `start`)
        backoff = Backoff(RESTART_INITIAL_S, RESTART_MAX_S, STABLE_S)
        while True:
            child, bell, process = self._child, self._bell, self.process
            if child is None or bell is None or process is None:  # stopped meanwhile
                return
            self._receive(child, bell)
            if self.pool.stopping.is_set():
                return
            try:
                code = process.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:  # it closed the socket but lives on: it is of no use any more
                process.kill()
                code = process.wait()
            how = describe_exit(code)
            delay = backoff.after(time.monotonic() - self._started_at)
            with self._lock:
                self._child = None
                names = self._died(child, bell, how)
            log.error(
                "capture worker %d (pid %d) died (%s); restarting it in %.1f s for camera(s) %s",
                self.index, process.pid, how, delay, ", ".join(sorted(names)) or "none",
            )  # fmt: skip
            while not self.pool.stopping.wait(delay):
                with self._lock:
                    if self.pool.stopping.is_set():  # the stop came between the wait and the lock
                        return
                    try:
                        self._spawn()
                    except Exception as exc:  # no processes or descriptors left, for now: try again later
                        delay = backoff.failed_start(delay)
                        log.error("capture worker %d: cannot start (%s); trying again in %.1f s", self.index, exc, delay)
                        continue
                    self.restarts += 1
                    break
            else:
                return

    def _died(self, child: Child, bell: Doorbell, how: str) -> list[str]:
        """With `_lock` held, after the worker died: its ends closed, its segments removed, its cameras told; the
        names of those it served. Each step is logged if it fails, and the next one taken."""
        names: list[str] = []
        steps: list[Callable[[], object]] = [child.close, bell.close]  # held frames ring a closed bell: no harm
        steps.append(partial(shm.unlink_prefix, shm.worker_prefix(self.pool.instance, self.index, self.generation)))
        for capture_id, rc in list(self.captures.items()):
            if rc.stopping:  # it was being stopped anyway: its capture has ended
                del self.captures[capture_id]
                steps.append(rc.ended)
                continue
            names.append(rc.name)
            steps.append(partial(self._orphaned, rc, how))
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("capture worker %d: cleaning up after it failed (going on)", self.index)
        return names

    def _orphaned(self, rc: RemoteCapture, how: str) -> None:
        notice = rc.worker_died(how)
        if notice is not None:
            self.pool.exchange.notify(notice)

    def _receive(self, child: Child, bell: Doorbell) -> None:
        """Until the worker's socket closes: its messages, in order."""
        while True:
            try:
                if not child.poll(SILENT_S):
                    process = self.process
                    log.error(
                        "capture worker %d (pid %s) sent nothing for %.0f s: killing it",
                        self.index, process.pid if process else "?", SILENT_S,
                    )  # fmt: skip
                    if process is not None:
                        process.kill()
                    return
                message = child.recv()
            except ChildGone:
                return
            except Exception as exc:  # not a message a worker of ours sends: it is of no use any more
                log.error("capture worker %d: unreadable message (%s): killing it", self.index, exc)
                with contextlib.suppress(OSError):
                    process = self.process
                    if process is not None:
                        process.kill()
                return
            try:
                self._handle(message, bell)
            except Exception:  # a bug here must not stop the frames of every camera of the worker
                log.exception("capture worker %d: could not handle %r", self.index, type(message).__name__)

    def _handle(self, message: object, bell: Doorbell) -> None:
        if isinstance(message, Alive):
            return
        exchange, captures = self.pool.exchange, self.captures
        rc = captures.get(message.capture_id)  # type: ignore[attr-defined]
        if rc is None:  # a capture already ended: nothing of it goes anywhere
            return
        if isinstance(message, FrameReady):
            m = message
            rc.deliver(bell, m.segment, m.slots, m.shape, m.slot, m.index, m.ts_wall, m.ts_mono, m.pts_ms)
        elif isinstance(message, CaptureStats):
            m2 = message
            rc.update(m2.state, m2.since, m2.decoded, m2.drops, m2.errors, m2.reconnects, m2.last_error, m2.fps,
                      m2.backend, m2.decoder)  # fmt: skip
        elif isinstance(message, CaptureNotice):
            notice_kind = NoticeKind(message.kind)
            rc.noticed(notice_kind)
            exchange.notify(Notice(rc.name, notice_kind, message.ts_wall, message.frame_index, message.detail))
        elif isinstance(message, ClipDone):
            if isinstance(message.report, ClipReport) and message.report.camera == rc.name:
                exchange.clip(message.report)
        elif isinstance(message, CaptureStopped):
            with self._lock:
                captures.pop(rc.capture_id, None)
            prefix = shm.worker_prefix(self.pool.instance, self.index, self.generation)
            for name in message.segments:  # only what this worker made: a name it sends is never trusted as a path
                if isinstance(name, str) and name.startswith(prefix) and "/" not in name:
                    shm.unlink(name)
            rc.ended()


class CaptureWorkers:
    """The capture workers of one daemon, and its record in the runtime directory (vigild.capture.shm)."""

    def __init__(
        self, count: int, slots: int, exchange: FrameExchange, runtime_dir: Path, cv2_threads: int = 1
    ) -> None:
        self.instance = shm.new_instance_id()
        self.slots = slots
        self.exchange = exchange
        self.cv2_threads = cv2_threads
        self.record = shm.InstanceRecord(runtime_dir / "shm", self.instance)
        self.handles = [WorkerHandle(self, index) for index in range(count)]
        self.stopping = threading.Event()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        shm.remove_stale(self.record.directory)
        self.record.acquire()
        self._started = True
        try:
            for handle in self.handles:
                handle.start()
        except OSError:  # no process could be started: nothing of this pool is left running
            self.stop()
            raise
        log.info(
            "capture in %d worker process(es) (pids %s), frames in shared memory vigild-%s-*",
            len(self.handles), ", ".join(str(h.pid) for h in self.handles), self.instance,
        )  # fmt: skip

    def capture(self, name: str, config: CameraConfig, spec: SourceSpec,
                recording: RecorderSettings | None = None) -> RemoteCapture:  # fmt: skip
        """A capture of `name` (not started) in the worker serving the fewest cameras."""
        with self._lock:
            handle = min(self.handles, key=lambda h: (h.load(), h.index))
            rc = RemoteCapture(handle, next(self._ids), name, config, spec, recording)
            handle.assigned.add(rc)
            return rc

    def stop(self) -> None:
        """After the captures were stopped: the workers exit, every segment of this daemon goes, then its record."""
        if not self._started or self.stopping.is_set():
            return
        self.stopping.set()
        for handle in self.handles:
            handle.request_exit()
        deadline = time.monotonic() + EXIT_WAIT_S  # all at once: a stop stays within systemd's patience
        for handle in self.handles:
            handle.stop(deadline)
        self.record.release()

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "pid": handle.pid,
                "cameras": sorted(rc.name for rc in list(handle.captures.values()) if not rc.stopping),
                "restarts": handle.restarts,
            }
            for handle in self.handles
        ]
