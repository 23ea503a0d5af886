"""The scheduler thread: gather ready frames from all cameras into a batch, run the chain, publish the events.

A batch closes when it holds `max_batch` frames, when every streaming camera has contributed one, or
`max_wait_ms` after its first frame, whichever comes first, so one model call serves many cameras.

Pipelined (`scheduler.pipeline`; by default on a GPU only): a batch taken is handed to the first plugin to start
ahead (`Chain.prefetch`: the detector letterboxes, runs the model and NMS on its own thread); while that runs, the
scheduler takes the next frames that come and finishes the batch before (the rest of the chain, events). Everything
it publishes keeps its order: a batch's events, then the camera notices that came with it. Calls (`call`) run
between batches with nothing started ahead.

The scheduler never calls up into whoever made it: what it learns about the cameras comes with the frames (the
exchange's notices), what it measures it keeps for others to read (counts, `latency`), and the one thing it tells
(every camera has ended) it tells by setting the event it was given.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

from vigild.capture.exchange import FrameExchange, Notice, NoticeKind, Taken
from vigild.config.motion import MotionConfig
from vigild.config.settings import SchedulerConfig
from vigild.events import Event, Publish
from vigild.frame import Frame
from vigild.lifecycle import ServiceThread
from vigild.pipeline.chain import Chain
from vigild.pipeline.durations import LATENCY_BUCKETS, Durations
from vigild.pipeline.gate import MotionGate

log = logging.getLogger("vigild.scheduler")

POLL_S = 0.2
AHEAD_POLL_S = 0.002
"""With a batch in flight, how often the scheduler looks whether its detection is done while it waits for frames."""
LATENCY_SAMPLES = 100_000

T = TypeVar("T")


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        exchange: FrameExchange,
        chain: Chain,
        publish: Publish,
        cameras: list[str],
        all_ended: threading.Event | None = None,
        device: str = "cpu",
        gate: MotionGate | None = None,
    ):
        """`all_ended`: set once every camera has ended (files that were read to their end), for the owner to stop.
        `device`: where the chain computes (`scheduler.pipeline` is on by default on a GPU only). `gate`: which
        frames of cameras with `motion:` go through the chain (vigild.pipeline.gate); the others are gated."""
        self.config = config
        self.device = device
        self.exchange = exchange
        self.chain = chain
        self.publish = publish
        self.cameras = list(cameras)
        self.all_ended = all_ended if all_ended is not None else threading.Event()
        self.processed: Counter[str] = Counter()
        self.batches = 0
        self.frames_in_batches = 0
        self.last_latency_s: dict[str, float] = {}
        self.latencies_s: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        """Capture-to-publish time of the latest frames (all cameras), for percentiles."""
        self.latency = Durations(LATENCY_BUCKETS)
        self.tap: Callable[[Frame], None] | None = None
        """Sees each frame the chain finished (the web console's live pictures): must not block."""
        """Capture-to-publish time of every frame (all cameras), counted into buckets (the metrics read it)."""
        self._ended: set[str] = set()
        self._down: set[str] = set()
        """Cameras whose `camera.down` was published and which have not come up since."""
        self.latest: dict[str, Frame] = {}
        """The last frame of each camera that came through the chain, or was gated (for snapshots)."""
        self.gate = gate if gate is not None else MotionGate()
        self.alive_at = time.monotonic()
        """When the scheduler last went round its loop: stale while a plugin is stuck (the watchdog reads it)."""
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = ServiceThread("scheduler", self._run)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.alive

    def stop(self, timeout: float | None = None) -> None:
        """Finish the batch in flight, publish the closing events of every camera still open, and return."""
        self._stop.set()
        self._thread.stop(timeout)

    def call(self, function: Callable[[], T], timeout: float) -> T:
        """Run `function` on the scheduler thread between two batches (to change the chain or the cameras without
        a lock on the hot path) and return its result. Raises TimeoutError, without running it, when the
        scheduler does not come round within `timeout` (a plugin is stuck)."""
        if not self._thread.alive:
            return function()
        future: Future[T] = Future()
        self._calls.put((function, future))
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.cancel():
                raise
            return future.result()  # it had started: let it finish

    def close_camera(self, camera: str, reason: str) -> None:
        """Scheduler thread: close a camera that was stopped on purpose (removed, reconfigured, paused)."""
        if camera not in self._down:
            self._close_camera(Notice(camera, NoticeKind.DOWN, time.time(), -1, {"reason": reason}))

    @property
    def pipelined(self) -> bool:
        """Batches overlap (`scheduler.pipeline`; unset: on a GPU only: on a CPU the forward pass already uses every
        core, and overlapping it with the Python of the rest of the chain measured slower, docs/performance.md)."""
        pipeline = self.config.pipeline
        return pipeline if pipeline is not None else self.device.startswith("cuda")

    def take_over(
        self, chain: Chain, config: SchedulerConfig, cameras: list[str], motion: Mapping[str, MotionConfig]
    ) -> None:
        """Scheduler thread, at a reconfiguration's swap: run `chain` (activated here) with `config` over `cameras`,
        gated by their `motion` settings."""
        chain.activate()
        self.chain = chain
        self.config = config
        self.gate.configure(motion)
        self.set_cameras(cameras)

    def set_cameras(self, cameras: list[str]) -> None:
        """Scheduler thread: the cameras of a new configuration; state of the others is forgotten."""
        for gone in set(self.cameras) - set(cameras):
            self._down.discard(gone)
            self._ended.discard(gone)
            self.latest.pop(gone, None)
            self.last_latency_s.pop(gone, None)
            self.processed.pop(gone, None)
        self.cameras = list(cameras)

    def reopen_camera(self, camera: str) -> None:
        """Scheduler thread: a camera that was closed on purpose starts again (resumed, or restarted)."""
        self._down.discard(camera)
        self._ended.discard(camera)

    def _run_calls(self) -> None:
        while True:
            try:
                function, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except BaseException as exc:
                    future.set_exception(exc)

    def _run(self, thread: ServiceThread) -> None:
        thread.ready()
        try:
            self._loop()
        finally:
            self._run_calls()  # nobody waits forever on a call made as we stopped

    def _loop(self) -> None:
        ahead: Taken | None = None
        """A batch started ahead (its detection running) and not finished yet."""
        work: list[Future[Any]] = []
        """What the chain started ahead for it."""
        while not self._stop.is_set():
            self.alive_at = time.monotonic()
            if not self._calls.empty():  # a change runs with nothing in flight
                if ahead is not None:
                    self._finish(ahead)
                    ahead = None
                self._run_calls()
            max_wait = self.config.max_wait_ms / 1000.0
            want = max(1, min(self.config.max_batch, self.exchange.streaming()))
            # with motion gating (and no pipelining), every waiting frame is taken: the gate keeps few, and those
            # go through in batches of at most max_batch (`_process`), fuller than the few of max_batch frames taken
            limit = self.config.max_batch
            if self.gate.cameras and not self.pipelined:
                limit = max(limit, self.exchange.waiting)
            if ahead is None:
                taken = self.exchange.take(limit, max_wait, want, POLL_S)
            else:  # frames for the next batch while the one in flight is detected, not longer
                while True:
                    taken = self.exchange.take(limit, max_wait, want, AHEAD_POLL_S)
                    if taken.frames or taken.opened or taken.closed or all(w.done() for w in work):
                        break
            gated: list[Frame] = []
            if taken.frames and self.gate.cameras:
                taken, gated = self._gated(taken)
            started = False
            if ahead is not None:
                if taken.frames and self.pipelined:
                    work = self.chain.prefetch(taken.frames)  # its detection runs while the one before is finished
                    started = True
                self._finish(ahead)
                ahead = None
            self._show(gated)  # after the batch before: the newest frames are shown last
            for notice in taken.opened:
                self._down.discard(notice.camera)
                self._publish_camera_event(self.gate.checked(notice), "camera.up")
            if taken.frames and self.pipelined:
                if not started:
                    work = self.chain.prefetch(taken.frames)
                ahead = taken  # finished next time round, once the next batch is started
                continue
            self._finish(taken)
        if ahead is not None:
            self._finish(ahead)
        for camera in self.cameras:
            if camera not in self._down:  # cameras already down (or ended) were closed then
                self._close_camera(Notice(camera, NoticeKind.DOWN, time.time(), -1, {"reason": "stopped"}))

    def _gated(self, taken: Taken) -> tuple[Taken, list[Frame]]:
        """`taken` with only the frames that go through the chain, and the gated ones."""
        through = self.gate.select(taken.frames)
        if len(through) == len(taken.frames):
            return taken, []
        kept = {id(frame) for frame in through}
        return Taken(through, taken.opened, taken.closed), [frame for frame in taken.frames if id(frame) not in kept]

    def _show(self, gated: list[Frame]) -> None:
        """Gated frames are their cameras' latest (snapshots) and go to the tap (the live view) as they are."""
        for frame in gated:
            self.latest[frame.camera] = frame
            if self.tap is not None:
                self.tap(frame)

    def _finish(self, taken: Taken) -> None:
        """Run the chain on the batch, publish its events, then close the cameras whose notices came with it."""
        if taken.frames:
            self._process(taken.frames)
        for notice in taken.closed:
            self._close_camera(notice)

    def _process(self, frames: list[Frame]) -> None:
        size = self.config.max_batch
        for at in range(0, len(frames), size):
            self._process_batch(frames[at : at + size])

    def _process_batch(self, frames: list[Frame]) -> None:
        try:
            passed = self.chain.process(frames)
        except Exception:  # the chain isolates plugin failures; this is a bug in vigild itself, keep running
            log.exception("chain failed on a batch of %d frames", len(frames))
            return
        for frame in frames:  # a frame a later plugin failed on still carries what earlier plugins decided
            for event in frame.events:
                self.publish(event)
        now = time.monotonic()  # handed to the bus: capture to publish
        self.gate.observe(frames)
        self.batches += 1
        self.frames_in_batches += len(frames)
        for frame in passed:
            self.processed[frame.camera] += 1
            self.latest[frame.camera] = frame
            if self.tap is not None:
                self.tap(frame)
            latency = now - frame.ts_mono
            self.last_latency_s[frame.camera] = latency
            self.latencies_s.append(latency)
            self.latency.observe(latency)

    def _close_camera(self, notice: Notice) -> None:
        """Let plugins close what they hold for the camera (tracks...), then say it is down."""
        for event in self.chain.source_ended(notice.camera, notice.ts_wall, notice.frame_index):
            self.publish(event)
        self.gate.camera_down(notice.camera)
        self._publish_camera_event(notice, "camera.down")
        self._down.add(notice.camera)
        if notice.kind is NoticeKind.ENDED:
            self._ended.add(notice.camera)
            if all(camera in self._ended for camera in self.cameras):
                log.info("every camera has ended; stopping")
                self.all_ended.set()

    def _publish_camera_event(self, notice: Notice, event_type: str) -> None:
        frame = notice.frame_index if notice.frame_index >= 0 else None
        self.publish(Event(event_type, notice.camera, notice.ts_wall, frame, data=dict(notice.detail)))
