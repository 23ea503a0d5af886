"""Durations counted into histogram buckets where they are measured: each frame's capture-to-publish latency (the
scheduler) and each plugin's time per batch (the chain). The metrics read them when Prometheus scrapes, so the
pipeline never calls up into the service that exposes them; a count is a bisect and two additions on the hot path.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
PLUGIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class Histogram:
    """A copy of `Durations` at one moment, as Prometheus shows it."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    """Observations at most each bound, then all of them (the `+Inf` bucket): one more than `bounds`."""
    sum_s: float
    created: float
    """Wall-clock time the counting began (Prometheus' `_created`)."""


class Durations:
    """Seconds observed on one thread (the scheduler's), counted per bucket: at most `bounds[i]`, the last past all."""

    __slots__ = ("bounds", "counts", "created", "sum_s")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum_s = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum_s += seconds

    def read(self) -> Histogram:
        """Safe from another thread: a copy (an observation made meanwhile shows in the next read)."""
        counts, total = list(self.counts), self.sum_s
        cumulative, running = [], 0
        for count in counts:
            running += count
            cumulative.append(running)
        return Histogram(self.bounds, tuple(cumulative), total, self.created)


@dataclass(frozen=True)
class Timings:
    """The histograms of a running daemon: the latency, and each plugin's time per batch by plugin id."""

    latency: Histogram
    plugins: dict[str, Histogram]
