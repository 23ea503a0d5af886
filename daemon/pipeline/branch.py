"""A plugin beside the chain: its instance runs on a thread of its own, fed after the stages before it, and the
chain never waits for it.

The chain offers each batch's frames to the branch and goes on. The branch keeps the newest frame of each camera
that it has not taken yet: when it cannot keep up, an older frame is replaced and counted as skipped (per camera),
so the branch always works on the newest frames and its backlog never grows. It takes every waiting frame as one
batch, runs the plugin on it (failures isolated as in the chain), and publishes the events the plugin put on each
frame, in frame order per camera. The frames it gets are copies of the chain's (their own `events`, the detections
as they were when offered), so nothing the branch does reaches the chain or is seen by it.

Closing a camera (its source ended, the daemon stops, a change closes it) is queued behind the camera's frame
already waiting: the branch runs the plugin's `on_source_end` in turn and publishes its events. The chain waits up to
`CLOSE_WAIT_S` for that, so a branch's closing events normally come before the camera's `camera.down`; a branch
stuck longer publishes them when it gets there. Stopping a branch lets it finish what is queued first.

Every call into the plugin (process, on_source_end) happens on the branch's thread, so the plugin needs no locks.
On a CPU a branch takes less than the chain: its thread runs at a lower scheduling priority (nice +`NICE`, Linux),
and torch's intra-op threads for its work are half the chain's (torch's OpenMP thread count is per calling thread).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from vigild.events import Event
from vigild.frame import Frame
from vigild.lifecycle import ServiceThread

log = logging.getLogger("vigild.branch")

CLOSE_WAIT_S = 5.0
STOP_WAIT_S = 5.0
NICE = 10
CPU_SHARE = 0.25
"""On a CPU, the share of its time a branch works by default (`branch_share`): measured on two cores, a branch
that works all the time takes half of the chain's rate (docs/performance.md), whatever its priority."""


def lower_priority(threads: int | None) -> None:
    """Called first on a branch's thread: it runs at nice +`NICE` (Linux; elsewhere, or where not allowed, at the
    chain's priority) and torch's intra-op threads for its work are `threads` (torch's OpenMP thread count is kept
    per calling thread: the chain's stay as they are)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    torch = sys.modules.get("torch")  # (not imported for a plugin that does not use it)
    if torch is not None and threads is not None:
        torch.set_num_threads(threads)


def branch_share(share: float | None, device: str) -> float:
    """A plugin's `branch_share`, else `CPU_SHARE` on a CPU and 1 on a GPU."""
    if share is not None:
        return share
    return 1.0 if device.startswith("cuda") else CPU_SHARE


def rest(cond: threading.Condition, busy_s: float, share: float, wake: Callable[[], bool]) -> None:
    """After `busy_s` of work, wait so that work stays `share` of the time; `wake()` (checked under `cond`) ends the
    rest early: the branch is stopping, or has closings to run."""
    if share >= 1:
        return
    with cond:
        cond.wait_for(wake, busy_s * (1 / share - 1))


def branch_threads(chain_threads: int | None) -> int | None:
    """torch threads for a branch's work: half the chain's."""
    return max(1, chain_threads // 2) if chain_threads else None


class BranchThread:
    """What every worker beside the chain shares (a `Branch`, the action recognizer's clip worker): its thread,
    niced with fewer torch threads (`lower_priority`) and running `_loop`; its stop (it finishes what it must, then
    ends; one stuck in its plugin is left behind, logged); and waiting for a camera's closing events, up to a limit,
    and after one wait in vain, not again until it has caught up (`_caught_up`), so no caller waits on it twice.
    Subclasses keep `working` (it holds work it took) and `busy_s` up to date, under `_cond`."""

    unit = "frames"
    """What `pending` and `skipped_total` count (vigild.plugin.BranchWork)."""

    def __init__(self, name: str, threads: int | None, share: float, pid: Callable[[], int | None] | None = None):
        """`pid`: the process its work is done in, when not the daemon's (`placement: process`)."""
        self.name = name
        self._pid = pid
        self.threads = branch_threads(threads)
        self.share = share
        """The most of its time it works (`branch_share`): it rests between batches."""
        self._cond = threading.Condition()
        self._stopping = False
        self._late = False
        """A closing was waited for in vain: later ones are not waited for until it has caught up."""
        self.busy_s = 0.0
        self.working = False
        """It holds work it took and has not finished."""
        self._thread = ServiceThread(f"branch-{name}", self._run)

    @property
    def pid(self) -> int | None:
        """The process its work is done in (`placement: process`), while there is one; None on a thread."""
        return self._pid() if self._pid is not None else None

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Finish what must be finished (closing events included), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def join(self, deadline: float) -> bool:
        """Wait for the thread until `deadline` (monotonic); whether it has ended (or never started)."""
        self._thread.stop(max(0.0, deadline - time.monotonic()))
        if self._thread.alive:
            log.error("branch %s did not finish in time (stuck in its plugin): leaving it behind", self.name)
            return False
        return True

    def stop(self, timeout: float = STOP_WAIT_S) -> bool:
        self.request_stop()
        return self.join(time.monotonic() + timeout)

    def _await_closing(self, done: threading.Event, camera: str, wait_s: float) -> None:
        """Wait up to `wait_s` for a closing queued with `done`; unless it is behind already."""
        if wait_s <= 0 or self._late or not self._thread.alive:
            return
        if not done.wait(wait_s):
            self._late = True
            log.warning("branch %s is busy: camera %s's closing events will follow later", self.name, camera)

    def _caught_up(self) -> None:
        """No closing is queued any more (under `_cond`): callers wait for closings again."""
        self._late = False

    def _run(self, thread: ServiceThread) -> None:
        thread.ready()
        lower_priority(self.threads)
        self._loop()

    def _loop(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class _Close:
    camera: str
    ts_wall: float
    frame_index: int
    seq: int
    done: threading.Event


class Branch(BranchThread):
    def __init__(
        self,
        name: str,
        run: Callable[[list[Frame]], set[int]],
        close: Callable[[str, float, int], list[Event]],
        publish: Callable[[Event], None],
        observe: Callable[[float, int], None],
        threads: int | None = None,
        share: float = 1.0,
        pid: Callable[[], int | None] | None = None,
    ):
        """`run`: the plugin over a batch (returns the ids of the frames that failed; failures reported by the
        caller's rules); `close`: the plugin's `on_source_end`; `publish`: where events go; `observe`: the seconds
        and frames of each batch (the stage's counts)."""
        super().__init__(name, threads, share, pid)
        self._run_batch = run
        self._close = close
        self._publish = publish
        self._observe = observe
        self._waiting: dict[str, tuple[int, Frame]] = {}
        """The newest frame of each camera not taken yet, with its sequence number."""
        self._closes: list[_Close] = []
        self._seq = 0
        self.skipped: Counter[str] = Counter()
        """Frames replaced by a newer one of the same camera before the branch took them."""
        self.frames = 0
        """Frames the plugin has run on."""

    # ----- the chain's side (scheduler thread)

    def offer(self, frames: list[Frame]) -> None:
        """Hand over copies of `frames`; never blocks on the plugin."""
        with self._cond:
            for frame in frames:
                self._seq += 1
                if frame.camera in self._waiting:
                    self.skipped[frame.camera] += 1
                self._waiting[frame.camera] = (self._seq, dataclasses.replace(frame, events=[]))
            self._cond.notify_all()

    def close_camera(self, camera: str, ts_wall: float, frame_index: int, wait_s: float = CLOSE_WAIT_S) -> None:
        """Queue the camera's closing behind its waiting frame; wait up to `wait_s` for its events to be out."""
        done = threading.Event()
        with self._cond:
            self._seq += 1
            self._closes.append(_Close(camera, ts_wall, frame_index, self._seq, done))
            self._cond.notify_all()
        self._await_closing(done, camera, wait_s)

    def rebind(self, run: Callable[[list[Frame]], set[int]], observe: Callable[[float, int], None]) -> None:
        """A reload's chain took over this branch's instance: its failures and time count there from now on."""
        self._run_batch, self._observe = run, observe

    def forget(self, camera: str) -> None:
        """Drop the counters of a camera that is gone."""
        with self._cond:
            self.skipped.pop(camera, None)

    @property
    def pending(self) -> int:
        return len(self._waiting) + len(self._closes)

    @property
    def skipped_total(self) -> int:
        return sum(dict(self.skipped).values())  # a copy: the scheduler may add a camera

    # ----- the branch's thread

    def _take(self) -> tuple[list[Frame], list[_Close]] | None:
        """The frames and closings to handle next, in order: a camera's frame offered after its closing waits for
        the next round. None once stopping with nothing left."""
        with self._cond:
            while not self._waiting and not self._closes:
                if self._stopping:
                    return None
                self._cond.wait()
            first_close: dict[str, int] = {}
            for item in self._closes:
                first_close.setdefault(item.camera, item.seq)
            batch = [
                (seq, frame)
                for camera, (seq, frame) in self._waiting.items()
                if seq < first_close.get(camera, seq + 1)
            ]
            # a frame held back (it came after its camera's closing) also holds back the closings after it
            held = {camera: seq for camera, (seq, _) in self._waiting.items() if seq > first_close.get(camera, seq)}
            closes = [item for item in self._closes if item.seq < held.get(item.camera, item.seq + 1)]
            self.working = True  # before anything leaves `pending`: an onlooker never sees it idle in between
            for _, frame in batch:
                del self._waiting[frame.camera]
            self._closes = [item for item in self._closes if item.seq >= held.get(item.camera, item.seq + 1)]
            return [frame for _, frame in sorted(batch, key=lambda item: item[0])], closes

    def _loop(self) -> None:
        while (work := self._take()) is not None:
            frames, closes = work
            if frames:
                started = time.perf_counter()
                try:
                    self._run_batch(frames)
                except Exception:  # the caller reports plugin failures; this is a bug in vigild itself
                    log.exception("branch %s failed on a batch of %d frames", self.name, len(frames))
                elapsed = time.perf_counter() - started
                self.busy_s += elapsed
                self._observe(elapsed, len(frames))
                self.frames += len(frames)
                for frame in frames:  # a frame the plugin failed on still carries the events it made before
                    for event in frame.events:
                        self._publish(event)
            for item in closes:
                try:
                    events = self._close(item.camera, item.ts_wall, item.frame_index)
                except Exception:
                    log.exception("branch %s failed to close camera %s", self.name, item.camera)
                    events = []
                for event in events:
                    self._publish(event)
                item.done.set()
            with self._cond:
                if closes and not self._closes:
                    self._caught_up()
                self.working = False
            if frames:  # its share of the time: frames offered meanwhile replace one another (counted)
                rest(self._cond, elapsed, self.share, lambda: self._stopping or bool(self._closes))
