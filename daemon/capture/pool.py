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
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from vigild.capture import shm
from vigild.capture.backends import BackendUnavailable, camera_backend
from vigild.capture.camera import CameraState, CameraStats
from vigild.capture.gst_pipeline import resolve_backend
from vigild.capture.sources import SourceSpec
from vigild.capture.worker import Hello
from vigild.config.settings import CameraConfig
from vigild.frame import Frame
from vigild.pipeline.exchange import FrameExchange, Notice, NoticeKind

log = logging.getLogger("vigild.capture")

RESTART_INITIAL_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 30.0
"""A worker that lived this long before dying restarts after the initial delay again."""
EXIT_WAIT_S = 2.0
SILENT_S = 15.0
"""A worker that sends nothing for this long (it sends counters every 0.25 s) is hung: it is killed and restarted
like one that died."""
_ONE = (1).to_bytes(8, sys.byteorder)


def auto_workers(usable_cpus: int, cameras: int) -> int:
    """`capture.workers: auto`: threads in the daemon below 8 usable CPUs (measured: docs/performance.md), else one
    worker per 4 CPUs, at most one per camera and 16 in all."""
    if usable_cpus < 8:
        return 0
    return max(1, min(usable_cpus // 4, cameras, 16))


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


def _release(states: np.ndarray, slot: int, bell: Doorbell) -> None:
    """The last reference to a frame's image went: its slot is the worker's again."""
    states[slot] = shm.FREE
    bell.ring()


def _taken(states: np.ndarray, slot: int, bell: Doorbell) -> None:
    """The scheduler took the frame: a worker waiting for its consumer sends the next one."""
    if states[slot] == shm.SENT:
        states[slot] = shm.TAKEN
        bell.ring()


class RemoteCapture:
    """A camera captured in a worker process, driven like a `CameraCapture` (the `Capture` protocol)."""

    def __init__(self, handle: WorkerHandle, capture_id: int, name: str, config: CameraConfig, spec: SourceSpec):
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

    def add_message(self) -> tuple[Any, ...]:
        return ("add", self.capture_id, self.name, self.config, self.spec, self.next_index, self.down_reported)

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

    def ended(self) -> None:
        if self.stats.state not in (CameraState.ENDED, CameraState.STOPPED):
            self.stats.state = CameraState.STOPPED
        self._done.set()


def _describe(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


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
        self._connection: Connection | None = None
        self._bell: Doorbell | None = None
        self._started_at = 0.0
        self._thread = threading.Thread(target=self._supervise, name=f"capture-worker-{index}", daemon=True)

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
        """With `_lock` held: a new process, told who it is and given every camera this handle serves."""
        self.generation += 1
        parent, child = socket.socketpair()
        bell = Doorbell()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vigild.capture.worker", str(child.fileno()), str(bell.fd)],
                pass_fds=(child.fileno(), bell.fd),
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            parent.close()
            bell.close()
            raise
        finally:
            child.close()
        self._connection, self._bell, self._started_at = Connection(parent.detach()), bell, time.monotonic()
        pool = self.pool
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self._send(Hello(pool.instance, self.index, self.generation, pool.slots, level, pool.cv2_threads))
        for rc in self.captures.values():
            if not rc.stopping:
                self._send(rc.add_message())

    def _send(self, message: object) -> None:
        connection = self._connection
        if connection is None:
            return
        try:
            with self._send_lock:
                connection.send(message)
        except OSError:
            pass  # it died: its thread sees the closed socket and restarts it with every camera

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
            if self._connection is None:  # no worker now (it died, the next one is not started): nothing runs it
                del self.captures[rc.capture_id]
                rc.ended()
                return
            self._send(("remove", rc.capture_id))

    def request_exit(self) -> None:
        """Ask the worker to exit (its captures were stopped)."""
        self._send(("exit",))

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
        if self._thread.ident is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()
            if self._bell is not None:
                self._bell.close()
            for rc in self.captures.values():
                rc.ended()
            self.captures.clear()

    # ----- the handle's thread

    def _supervise(self) -> None:
        failures = 0
        while True:
            connection, bell, process = self._connection, self._bell, self.process
            if connection is None or bell is None or process is None:  # stopped meanwhile
                return
            self._receive(connection, bell)
            if self.pool.stopping.is_set():
                return
            try:
                code = process.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:  # it closed the socket but lives on: it is of no use any more
                process.kill()
                code = process.wait()
            how = _describe(code)
            lived = time.monotonic() - self._started_at
            failures = 1 if lived >= STABLE_S else failures + 1
            delay = min(RESTART_MAX_S, RESTART_INITIAL_S * 2 ** (failures - 1))
            with self._lock:
                connection.close()
                self._connection = None
                bell.close()  # frames still held ring it harmlessly
                shm.unlink_prefix(shm.worker_prefix(self.pool.instance, self.index, self.generation))
                names = []
                for capture_id, rc in list(self.captures.items()):
                    if rc.stopping:  # it was being stopped anyway: its capture has ended
                        del self.captures[capture_id]
                        rc.ended()
                        continue
                    names.append(rc.name)
                    notice = rc.worker_died(how)
                    if notice is not None:
                        self.pool.exchange.notify(notice)
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
                    except OSError as exc:  # no processes or descriptors left, for now: try again later
                        delay = min(RESTART_MAX_S, delay * 2)
                        log.error("capture worker %d: cannot start (%s); trying again in %.1f s", self.index, exc, delay)
                        continue
                    self.restarts += 1
                    break
            else:
                return

    def _receive(self, connection: Connection, bell: Doorbell) -> None:
        """Until the worker's socket closes: its messages, in order."""
        while True:
            try:
                if not connection.poll(SILENT_S):
                    process = self.process
                    log.error(
                        "capture worker %d (pid %s) sent nothing for %.0f s: killing it",
                        self.index, process.pid if process else "?", SILENT_S,
                    )  # fmt: skip
                    if process is not None:
                        process.kill()
                    return
                message = connection.recv()
            except (EOFError, OSError):
                return
            try:
                self._handle(message, bell)
            except Exception:  # a bug here must not stop the frames of every camera of the worker
                log.exception("capture worker %d: could not handle %r", self.index, message[:2])

    def _handle(self, message: tuple[Any, ...], bell: Doorbell) -> None:
        exchange, captures = self.pool.exchange, self.captures
        kind = message[0]
        rc = captures.get(message[1])
        if rc is None:  # a capture already ended: nothing of it goes anywhere
            return
        if kind == "frame":
            self._frame(rc, bell, *message[2:])
        elif kind == "stats":
            rc.update(*message[2:])
        elif kind == "notice":
            notice_kind = NoticeKind(message[2])
            rc.noticed(notice_kind)
            exchange.notify(Notice(rc.name, notice_kind, message[3], message[4], message[5]))
        elif kind == "stopped":
            with self._lock:
                captures.pop(rc.capture_id, None)
            prefix = shm.worker_prefix(self.pool.instance, self.index, self.generation)
            for name in message[2]:  # only what this worker made: a name it sends is never trusted as a path
                if isinstance(name, str) and name.startswith(prefix) and "/" not in name:
                    shm.unlink(name)
            rc.ended()

    def _frame(
        self,
        rc: RemoteCapture,
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
        segment = rc.segment
        if segment is None or segment.name != name:
            try:
                prefix = shm.worker_prefix(self.pool.instance, self.index, self.generation)
                segment = shm.Segment.attach(name, shape, slots, prefix)
            except FileNotFoundError:  # its capture stopped and the worker let go of it: the frame is void anyway
                return
            except ValueError as exc:  # not what a worker of ours sends: nothing of it is mapped or touched
                log.error("capture worker %d: refused frame memory for camera %s: %s", self.index, rc.name, exc)
                return
            except OSError as exc:  # no descriptors or memory left: the frame is lost, its slot goes back
                log.error("camera %s: cannot map frame memory %s: %s", rc.name, name, exc)
                self._send(("free", name, slot))
                return
            rc.segment = segment  # frames of the one before keep their mapping for as long as they live
        try:
            lease = segment.lease(slot)
        except ValueError as exc:
            log.error("capture worker %d: camera %s: %s", self.index, rc.name, exc)
            return
        weakref.finalize(lease, _release, segment.states, slot, bell)
        frame = Frame(rc.name, index, ts_wall, ts_mono, np.asarray(lease), pts_ms)
        on_taken = partial(_taken, segment.states, slot, bell) if rc.wait_for_consumer else None
        rc.next_index = index + 1
        if self.pool.exchange.put(frame, on_taken=on_taken):
            rc.stats.frames_delivered += 1


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

    def capture(self, name: str, config: CameraConfig, spec: SourceSpec) -> RemoteCapture:
        """A capture of `name` (not started) in the worker serving the fewest cameras."""
        with self._lock:
            handle = min(self.handles, key=lambda h: (h.load(), h.index))
            rc = RemoteCapture(handle, next(self._ids), name, config, spec)
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
