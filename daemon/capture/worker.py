"""A capture worker: a process that runs the capture threads of a group of cameras and hands their frames to the
daemon through shared memory (`capture.workers` > 0).

The daemon starts it as `python -P -m vigild.capture.worker <socket fd> <doorbell fd>` (-P: nothing is imported
from the directory the daemon was started in, only the installed vigild) and drives it over the socket
(multiprocessing's framed pickles): `add` a camera (its config, source, the frame number to go on from), `remove`
one, `exit`. The worker answers with, in order per camera: `frame` (segment, slot, size, number, timestamps),
`notice` (up/down/ended, each after a `stats` of the same moment), `stats` (the capture counters, every
STATS_INTERVAL_S), `stopped` (the capture thread ended). The pixels go through shared memory (vigild.capture.shm):
the socket carries only slot numbers. The daemon rings the doorbell (an eventfd) when it takes or lets go of a
frame, which wakes the captures waiting for a slot or for their consumer.

Everything else is the same `CameraCapture` as in the daemon: reconnects, backoff, stall watchdog, decoders. When
the daemon's end of the socket closes (it stopped, or died), the worker unlinks its segments and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from vigild.capture import shm
from vigild.capture.camera import CameraCapture, CameraStats
from vigild.capture.clips import ClipOrder, ClipReport, RecorderSettings
from vigild.capture.exchange import Notice
from vigild.capture.messages import (
    AddCapture,
    Alive,
    CaptureNotice,
    CaptureStats,
    CaptureStopped,
    ClipDone,
    FrameReady,
    FreeSlot,
    RecordClip,
    RemoveCapture,
    WorkerHello,
)
from vigild.children import Stop, accept, exit_now
from vigild.config.settings import CameraConfig
from vigild.config.sources import SourceSpec
from vigild.frame import Frame
from vigild.lifecycle import ServiceThread

log = logging.getLogger("vigild.capture")

STATS_INTERVAL_S = 0.25
WAIT_POLL_S = 0.5
"""A capture waiting for a slot or its consumer rechecks this often, even without a doorbell."""
EXIT_JOIN_S = 1.5


def stats_message(capture_id: int, stats: CameraStats, slot_drops: int) -> CaptureStats:
    return CaptureStats(capture_id, stats.state.value, stats.state_since, stats.frames_decoded,
                        stats.source_drops + slot_drops, stats.decode_errors, stats.reconnects, stats.last_error,
                        stats.source_fps, stats.backend, stats.decoder)  # fmt: skip


class ShmSink:
    """A camera's `FrameSink` in a worker: frames into its segment's slots, notices and slot numbers to the daemon."""

    def __init__(self, worker: Worker, capture_id: int, camera: str):
        self.worker = worker
        self.capture_id = capture_id
        self.camera = camera
        self.slot_drops = 0
        """Frames dropped because the daemon still held every slot (a realtime camera never waits for one)."""
        self.stopped = False
        self.capture: CameraCapture | None = None
        self._segment: shm.Segment | None = None
        self._images: list[np.ndarray] = []
        self._old: list[shm.Segment] = []
        """Segments of an earlier frame size, unlinked once the daemon has let go of all their slots."""
        self._sequence = 0
        self._last: tuple[shm.Segment, int] | None = None

    def _new_segment(self, shape: tuple[int, int, int]) -> shm.Segment:
        hello = self.worker.hello
        self._sequence += 1
        name = shm.SegmentName(hello.instance, hello.worker, hello.generation, self.capture_id, self._sequence)
        segment = shm.Segment.create_new(name, shape, hello.slots)
        if self._segment is not None:
            self._old.append(self._segment)
        self._segment = segment
        self._images = [segment.image(slot) for slot in range(segment.slots)]
        return segment

    def _segments(self) -> list[shm.Segment]:
        """The older segments still held, then the current one."""
        return [*self._old, *([self._segment] if self._segment is not None else [])]

    def segment_named(self, name: str) -> shm.Segment | None:
        for segment in self._segments():
            if segment.name == name:
                return segment
        return None

    def _unlink_released(self) -> None:
        for segment in list(self._old):
            if not segment.states.any():  # every slot FREE: the daemon holds none of it (and has mapped it)
                shm.unlink(segment.name)
                self._old.remove(segment)

    def _wait(self, ready: Any) -> bool:
        """Block until `ready()` or the sink stops; whether `ready()`."""
        with self.worker.doorbell:
            while not self.stopped and not ready():
                self.worker.doorbell.wait(WAIT_POLL_S)
        return not self.stopped

    def put(self, frame: Frame, wait: bool = False) -> bool:
        if self.stopped:
            return False
        image = frame.image
        shape = (image.shape[0], image.shape[1], 3)
        segment = self._segment if self._segment is not None and self._segment.shape == shape else None
        if segment is None:
            segment = self._new_segment(shape)
        if self._old:
            self._unlink_released()
        slot = segment.free_slot()
        if slot is None:
            if not wait:
                self.slot_drops += 1  # the newest frame goes; the daemon still has the ones before it
                return True
            if not self._wait(lambda: segment.free_slot() is not None):
                return False
            slot = segment.free_slot()
            assert slot is not None
        np.copyto(self._images[slot], image.reshape(shape))
        last = self._last
        if wait and last is not None:
            previous, previous_slot = last
            if not self._wait(lambda: previous.states[previous_slot] != shm.SENT):
                return False
        if self.stopped:
            return False
        segment.states[slot] = shm.SENT
        self._last = (segment, slot)
        self.worker.send(FrameReady(self.capture_id, segment.name, segment.slots, shape, slot, frame.index,
                                    frame.ts_wall, frame.ts_mono, frame.pts_ms))  # fmt: skip
        return True

    def notify(self, notice: Notice) -> None:
        if self.capture is not None:  # the counters of the same moment first: a status read after it agrees
            self.worker.send(stats_message(self.capture_id, self.capture.stats, self.slot_drops))
        self.worker.send(CaptureNotice(self.capture_id, notice.kind.value, notice.ts_wall, notice.frame_index,
                                       dict(notice.detail)))  # fmt: skip

    def clip(self, report: ClipReport) -> None:
        self.worker.send(ClipDone(self.capture_id, report))

    def stop(self) -> None:
        self.stopped = True
        with self.worker.doorbell:
            self.worker.doorbell.notify_all()

    def close(self) -> list[str]:
        """The capture thread has ended: the names of its segments, for the daemon to unlink once it has read the
        frames still on their way (the worker unlinking them now could pull a file's last frame from under it)."""
        names = [segment.name for segment in self._segments()]
        self._old, self._segment, self._images = [], None, []
        return names


class WorkerCapture(CameraCapture):
    """A `CameraCapture` that tells the daemon when its thread has ended."""

    sink: ShmSink

    def _run(self, thread: ServiceThread) -> None:
        try:
            super()._run(thread)
        finally:
            sink = self.sink
            segments = sink.close()
            worker = sink.worker
            worker.send(stats_message(sink.capture_id, self.stats, sink.slot_drops))
            worker.send(CaptureStopped(sink.capture_id, segments))
            worker.forget(sink.capture_id)


class Worker:
    def __init__(self, connection: Connection, doorbell_fd: int, hello: WorkerHello):
        self.connection = connection
        self.hello = hello
        self.doorbell = threading.Condition()
        self._doorbell_fd = doorbell_fd
        self._send_lock = threading.Lock()
        self._captures: dict[int, WorkerCapture] = {}
        self._lock = threading.Lock()
        self._exit = threading.Event()

    def send(self, message: object) -> None:
        try:
            with self._send_lock:
                self.connection.send(message)
        except OSError:
            self._exit.set()  # the daemon is gone: the main loop exits

    def forget(self, capture_id: int) -> None:
        with self._lock:
            self._captures.pop(capture_id, None)

    def _ring_loop(self) -> None:
        """Wake the waiting captures whenever the daemon rings (it took or let go of a frame)."""
        poller = select.poll()
        poller.register(self._doorbell_fd, select.POLLIN)
        while not self._exit.is_set():
            if poller.poll(int(WAIT_POLL_S * 1000)):
                with contextlib.suppress(BlockingIOError):
                    os.read(self._doorbell_fd, 8)
                with self.doorbell:
                    self.doorbell.notify_all()

    def _stats_loop(self) -> None:
        """Counters of every capture; a worker without cameras still says it is alive (the daemon kills a worker
        that says nothing for SILENT_S)."""
        while not self._exit.wait(STATS_INTERVAL_S):
            with self._lock:
                captures = list(self._captures.values())
            for capture in captures:
                self.send(stats_message(capture.sink.capture_id, capture.stats, capture.sink.slot_drops))
            if not captures:
                self.send(Alive())

    def add(self, capture_id: int, name: str, config: CameraConfig, spec: SourceSpec, first: int, down: bool,
            recording: RecorderSettings | None = None) -> None:  # fmt: skip
        sink = ShmSink(self, capture_id, name)
        capture = WorkerCapture(name, config, spec, sink, first_index=first, down_reported=down, recording=recording)
        capture.sink = sink
        sink.capture = capture
        with self._lock:
            self._captures[capture_id] = capture
        capture.start()

    def free(self, segment_name: str, slot: int) -> None:
        with self._lock:
            captures = list(self._captures.values())
        for capture in captures:
            segment = capture.sink.segment_named(segment_name)
            if segment is not None:
                segment.states[slot] = shm.FREE
                with self.doorbell:
                    self.doorbell.notify_all()

    def record(self, capture_id: int, order: ClipOrder) -> None:
        with self._lock:
            capture = self._captures.get(capture_id)
        if capture is not None:
            capture.record(order)

    def remove(self, capture_id: int) -> None:
        with self._lock:
            capture = self._captures.get(capture_id)
        if capture is not None:
            capture.stop()
            capture.sink.stop()

    def run(self) -> int:
        for target in (self._ring_loop, self._stats_loop):
            threading.Thread(target=target, name=target.__name__.strip("_"), daemon=True).start()
        orderly = False
        while not self._exit.is_set():
            try:
                message = self.connection.recv()
            except (EOFError, OSError):
                break  # the daemon is gone
            if isinstance(message, AddCapture):
                self.add(message.capture_id, message.name, message.config, message.spec, message.first_index,
                         message.down_reported, message.recording)  # fmt: skip
            elif isinstance(message, RecordClip):
                self.record(message.capture_id, message.order)
            elif isinstance(message, RemoveCapture):
                self.remove(message.capture_id)
            elif isinstance(message, FreeSlot):
                self.free(message.segment, message.slot)
            elif isinstance(message, Stop):
                orderly = True
                break
        self._exit.set()
        with self._lock:
            captures = list(self._captures.values())
        for capture in captures:
            capture.stop()
            capture.sink.stop()
        if orderly:  # one deadline for all: a capture stuck in its source is left behind (os._exit below)
            deadline = time.monotonic() + EXIT_JOIN_S
            for capture in captures:
                capture.join(max(0.0, deadline - time.monotonic()))
        hello = self.hello
        shm.unlink_prefix(shm.worker_prefix(hello.instance, hello.worker, hello.generation))
        return 0


def main(argv: list[str]) -> int:
    # the daemon decides when its workers stop: not a Ctrl-C at the terminal, nor systemd's SIGTERM to the whole
    # cgroup (the daemon sends `exit` once its captures are stopped; if it dies, the socket closes)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    connection, hello = accept(argv)
    doorbell_fd = int(argv[2])
    logging.basicConfig(
        level=hello.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s[worker {hello.worker}]: %(message)s",
        stream=sys.stderr,
    )
    import cv2

    cv2.setNumThreads(hello.cv2_threads)
    Worker(connection, doorbell_fd, hello).run()
    exit_now()  # capture threads stuck in a source must not hold the process
    return 0


if __name__ == "__main__":
    # run as the imported module, not as __main__: what it sends pickles under the classes' real names
    from vigild.capture.worker import main as module_main

    module_main(sys.argv)
