"""What most outputs share: a bounded queue the bus fills without blocking, and a thread of the output's own that
empties it, so that an output that falls behind or fails never slows the others or the chain.

A subclass says how to set up (`open`, on its thread: a socket is bound there, a file opened), deliver a batch
(`deliver`), do something now and then (`tick`, at least every `tick_s`) and close (`close`). The queue drops the
newest event when it is full and counts it under `queue_full`; what `deliver` cannot hand on it counts under a
reason of its own (`self.drop(reason, n)`). `status()` is the heartbeat's `outputs.<id>`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Any

from vigild.lifecycle import ServiceThread, StartError
from vigild.outputs.bus import Stamped

log = logging.getLogger("vigild.outputs")

STOP_TIMEOUT_S = 10.0


class OutputError(Exception):
    """An output could not start (its socket or file); the message says why."""


class QueuedOutput:
    heartbeats = False
    tick_s = 1.0
    batch_max = 512

    def __init__(self, output_id: str, queue_size: int):
        self.id = output_id
        self.queue_size = queue_size
        self.delivered = 0
        self.drops: Counter[str] = Counter()
        self.last_seq = 0
        """The seq of the last event this output delivered (or dropped)."""
        self.alive_at = time.monotonic()
        """When its thread last went round its loop (at least every `tick_s`)."""
        self._queue: deque[Stamped] = deque()
        self._cond = threading.Condition()
        self._thread = ServiceThread(f"output-{output_id}", self._serve)

    # ----- what a subclass provides

    def open(self) -> None:
        """On the output's thread, before anything is delivered; raise to fail the start."""

    def deliver(self, batch: list[Stamped]) -> None:
        """Hand on `batch` (in seq order), adding what went to `self.delivered`; count what could not with
        `self.drop`."""
        raise NotImplementedError

    def tick(self) -> None:
        """On the output's thread, between batches, at least every `tick_s`."""

    def close(self) -> None:
        """On the output's thread, after the last batch."""

    # ----- the bus's side

    def feed(self, item: Stamped) -> None:
        with self._cond:
            if len(self._queue) >= self.queue_size:
                self.drops["queue_full"] += 1
                return
            self._queue.append(item)
            self._cond.notify()

    def start(self) -> None:
        try:
            self._thread.start()
        except StartError as exc:
            raise OutputError(str(exc)) from None

    def stop(self) -> None:
        """Deliver what is queued, then close."""
        self._thread.stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.stop(STOP_TIMEOUT_S)

    def drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] += count

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def state(self) -> str:
        if self._thread.error is not None:
            return "failed"
        return "running" if self._thread.alive else "stopped"

    def status(self) -> dict[str, Any]:
        with self._cond:
            oldest = self._queue[0].event.ts_wall if self._queue else None
            queued = len(self._queue)
        return {
            "type": type(self).__name__,
            "state": self.state,
            "error": self._thread.error,
            "delivered": self.delivered,
            "last_seq": self.last_seq,
            "lag_events": queued,
            "lag_s": round(max(0.0, time.time() - oldest), 3) if oldest is not None else 0.0,
            "drops": dict(sorted(self.drops.items())),
        }

    # ----- the output's thread

    def _take(self) -> list[Stamped] | None:
        """The next batch (empty after `tick_s` with nothing queued); None once stopping with nothing left."""
        with self._cond:
            if not self._queue and not self._thread.stopping.is_set():
                self._cond.wait(self.tick_s)
            if not self._queue:
                return None if self._thread.stopping.is_set() else []
            count = min(len(self._queue), self.batch_max)
            return [self._queue.popleft() for _ in range(count)]

    def _serve(self, thread: ServiceThread) -> None:
        self.open()
        thread.ready()
        try:
            while True:
                self.alive_at = time.monotonic()
                batch = self._take()
                if batch is None:
                    break
                self.tick()
                if batch:
                    self.deliver(batch)
                    self.last_seq = next((i.seq for i in reversed(batch) if not i.event.is_heartbeat), self.last_seq)
        finally:
            self.close()
