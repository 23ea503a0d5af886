"""The action recognizer as a branch: clips are classified on a thread of its own, beside the chain.

The chain still cuts every sampled frame into the tubes, in order (cheap, on the device), and hands over each clip
that falls due as a copy (the tube goes on filling) with the generation of its slot and the detections it was cut
around. Tubes released (a track ended, a camera closed) follow in the same queue, so a release is never scored
before the clips cut ahead of it, and an `action.end` never comes before its `action.start`.

When the worker cannot keep up, the queue keeps at most `backlog` clips: the oldest clips go, counted in
`skipped` (per camera), so the worker always classifies the newest full tubes. A tube's crops are never dropped (the
chain cut them), and releases are never dropped. Each round takes clips and releases in order, up to a batch of
clips, classifies the clips together, then scores and releases in order and publishes the events (those of the
frame each clip was cut from: its index, time and object).

A camera's closing (`release(..., wait_s)`) waits up to `CLOSE_WAIT_S` for the worker to get there, so its
closing events normally come before the camera's `camera.down`; a worker stuck longer publishes them when it gets
there, and later closings are not waited for until it has caught up. Stopping handles the releases still queued (the
closing events are never lost) and skips the clips still queued.

The worker runs at a lower priority than the chain on a CPU (vigild.pipeline.branch.lower_priority), and works
at most `share` of its time (`branch_share`; 0.25 on a CPU): after each round it rests three times as long as the
round took, unless a release comes. A round takes as many clips as the model classifies in about `ROUND_S` (measured
as it goes, from one clip at first, at most `batch`), so that a round on a CPU is short and a closing never waits
long for it, while on a GPU rounds are whole batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vigild.events import Event
from vigild.frame import Detections
from vigild.pipeline.branch import BranchThread, rest
from vigild.plugins.actions.scoring import ActionScores

log = logging.getLogger("vigild.plugins.actions")

FAILURE_LOG_INTERVAL_S = 10.0
ROUND_S = 1.0
"""About how long one round of classification takes, at most (unless one clip takes longer)."""


@dataclass(frozen=True)
class Clips:
    """The clips of frame `frame_index` of `camera` that fell due: one per slot."""

    camera: str
    ts: float
    frame_index: int
    slots: np.ndarray
    generations: np.ndarray
    objects: Detections | None
    clips: torch.Tensor
    """(K, 3, T, S, S) uint8, a copy: the tubes go on filling."""


@dataclass(frozen=True)
class Release:
    """These slots' tracks ended on frame `frame_index` (`reason`); `sightings[i]`: slot i's last detection."""

    camera: str
    ts: float
    frame_index: int
    slots: np.ndarray
    generations: np.ndarray
    reason: str
    sightings: Sequence[Detections | None]
    awaited: bool = False
    """A camera's closing that the chain waits for."""
    done: threading.Event = field(default_factory=threading.Event)


class ClipWorker(BranchThread):
    unit = "clips"

    def __init__(
        self,
        name: str,
        classify: Callable[[torch.Tensor], np.ndarray],
        scores: ActionScores,
        publish: Callable[[Event], None],
        backlog: int,
        batch: int,
        chain_threads: int | None,
        share: float = 1.0,
        pid: Callable[[], int | None] | None = None,
    ):
        super().__init__(name, chain_threads, share, pid)
        self._classify = classify
        self._scores = scores
        self._publish = publish
        self.backlog = backlog
        self.batch = batch
        self._clip_s: float | None = None
        """Seconds per clip of the last round, for the size of the next."""
        self._queue: deque[Clips | Release] = deque()
        self._queued_clips = 0
        self._awaited = 0
        """Releases queued that someone waits for."""
        self.skipped: Counter[str] = Counter()
        """Clips dropped from the queue (oldest first) to keep up, or still queued at stop, by camera."""
        self.classified = 0
        self.failed = 0
        """Clips the model failed on (their events are lost; their tubes are classified again at the next interval)."""
        self._last_failure_log = -FAILURE_LOG_INTERVAL_S

    # ----- the chain's side

    @property
    def pending(self) -> int:
        """Clips and releases queued."""
        with self._cond:
            return self._queued_clips + sum(isinstance(item, Release) for item in self._queue)

    @property
    def skipped_total(self) -> int:
        with self._cond:
            return sum(self.skipped.values())

    def put_clips(self, item: Clips) -> None:
        """Queue a frame's due clips; the oldest queued clips go (counted) beyond `backlog`. Never blocks on the
        model."""
        with self._cond:
            self._queue.append(item)
            self._queued_clips += len(item.slots)
            while self._queued_clips > self.backlog:
                oldest = next(entry for entry in self._queue if isinstance(entry, Clips))
                self._queue.remove(oldest)
                self._queued_clips -= len(oldest.slots)
                self.skipped[oldest.camera] += len(oldest.slots)
            self._cond.notify_all()

    def release(self, item: Release, wait_s: float = 0.0) -> None:
        """Queue a release behind the clips before it; wait up to `wait_s` for its events to be out (a camera's
        closing: the worker cuts its rest short for it)."""
        with self._cond:
            self._queue.append(item)
            if item.awaited:
                self._awaited += 1
            self._cond.notify_all()
        self._await_closing(item.done, item.camera, wait_s)

    # `stop()` (BranchThread): the releases queued are handled, the clips still queued skipped (counted)

    # ----- the worker's thread

    def _take(self) -> list[Clips | Release] | None:
        """Queued items in order, up to a batch of clips (releases between them come along); None once stopping
        with nothing left. At stop, queued clips are skipped (counted) and only releases are taken."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            taken: list[Clips | Release] = []
            clips = 0
            batch = 1 if self._clip_s is None else max(1, min(self.batch, int(ROUND_S / max(self._clip_s, 1e-6))))
            while self._queue and (clips < batch or isinstance(self._queue[0], Release)):
                item = self._queue.popleft()
                if isinstance(item, Clips):
                    self._queued_clips -= len(item.slots)
                    if self._stopping:
                        self.skipped[item.camera] += len(item.slots)
                        continue
                    clips += len(item.slots)
                taken.append(item)
            self.working = True  # under the lock that took them: an onlooker never sees it idle in between
            return taken

    def _loop(self) -> None:
        while (taken := self._take()) is not None:
            started = time.perf_counter()
            due = [item for item in taken if isinstance(item, Clips)]
            scores: np.ndarray | None = None
            if due:
                try:
                    scores = self._classify(torch.cat([item.clips for item in due]))
                except Exception as exc:
                    self.failed += sum(len(item.slots) for item in due)
                    self._log_failure(exc, sum(len(item.slots) for item in due))
            start = 0
            for item in taken:
                try:
                    if isinstance(item, Clips):
                        if scores is None:
                            continue
                        part = scores[start : start + len(item.slots)]
                        start += len(item.slots)
                        events = self._scores.score(item.camera, item.ts, item.frame_index, item.slots,
                                                    item.generations, item.objects, part)  # fmt: skip
                    else:
                        events = self._scores.release(item.camera, item.ts, item.frame_index, item.slots,
                                                      item.generations, item.reason, item.sightings)  # fmt: skip
                except Exception:  # a bug in vigild itself: the worker goes on with the next item
                    log.exception("branch %s failed on an item of camera %s", self.name, item.camera)
                    events = []
                for event in events:
                    self._publish(event)
                if isinstance(item, Release):
                    item.done.set()
                    if item.awaited:
                        with self._cond:
                            self._awaited -= 1
            elapsed = time.perf_counter() - started
            if scores is not None:
                self.classified += len(scores)
                self._clip_s = elapsed / max(1, len(scores))
            self.busy_s += elapsed
            with self._cond:
                if not any(isinstance(item, Release) for item in self._queue):
                    self._caught_up()
                self.working = False
            if due:  # its share of the time: clips queued meanwhile beyond the backlog are skipped (counted)
                rest(self._cond, elapsed, self.share, self._wake)

    def _wake(self) -> bool:
        """Ends a rest: stopping, or a release someone waits for (a camera's closing) (under the lock)."""
        return self._stopping or self._awaited > 0

    def _log_failure(self, exc: Exception, clips: int) -> None:
        now = time.monotonic()
        if now - self._last_failure_log >= FAILURE_LOG_INTERVAL_S:
            self._last_failure_log = now
            log.error("branch %s: the model failed on %d clips (%d so far): %s: %s", self.name, clips, self.failed,
                      type(exc).__name__, exc, exc_info=self.failed == clips)  # fmt: skip
