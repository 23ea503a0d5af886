"""What the action recognizer makes of a tube's clip scores: smoothing, hysteresis, `action.start` and `action.end`.

State is kept per tube slot and per generation of the slot (the tracks a slot has served): a clip or a release of an
older generation than the slot's state is stale and changes nothing; one of a newer generation starts the slot afresh.
So the same rules hold whether scores come right after the crops were cut (in the chain) or later, on the
recognizer's own worker (as a branch): events are those of the clip's frame (its index, its time, its object), in
the order the clips and releases are given.

Every method takes the lock: the chain reads the current top actions (`top`) while the worker scores.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vigild.events import Event, object_payload
from vigild.frame import Detections


@dataclass(frozen=True)
class ScoreRules:
    labels: tuple[str, ...]
    interest: np.ndarray
    """Indices of the labels that raise events."""
    start_at: np.ndarray
    """Per label of `interest`: the smoothed score at which it starts."""
    end_below: np.ndarray
    smoothing: float
    min_clips: int


class ActionScores:
    def __init__(self, capacity: int, rules: ScoreRules):
        self.rules = rules
        n, k = capacity, len(rules.interest)
        self.lock = threading.Lock()
        self.generation = np.zeros(n, np.int64)
        """The generation of each slot this state is about."""
        self.smoothed = np.zeros((n, len(rules.labels)), np.float32)
        self.clips_seen = np.zeros(n, np.int64)
        self.streak = np.zeros((n, k), np.int64)
        self.active = np.zeros((n, k), bool)
        self.active_since = np.zeros((n, k), np.float64)
        self.label_names = np.array(rules.labels, object)

    def _current(self, slots: np.ndarray, generations: np.ndarray) -> np.ndarray:
        """Mask of the slots still at these generations; slots at a newer one start afresh (a new track)."""
        newer = generations > self.generation[slots]
        if newer.any():
            fresh = slots[newer]
            self.generation[fresh] = generations[newer]
            self.smoothed[fresh] = 0
            self.clips_seen[fresh] = 0
            self.streak[fresh] = 0
            self.active[fresh] = False
        return generations == self.generation[slots]

    def score(
        self,
        camera: str,
        ts: float,
        frame_index: int,
        slots: np.ndarray,
        generations: np.ndarray,
        objects: Detections | None,
        scores: np.ndarray,
    ) -> list[Event]:
        """The clips of frame `frame_index` of `camera` were classified (`scores`, one row per slot): update the
        slots and return the frame's `action.end` and `action.start` events. `objects`: the detection each clip was
        cut around (row for row; None in whole-frame mode)."""
        r = self.rules
        with self.lock:
            current = self._current(slots, generations)
            if not current.all():
                slots, scores = slots[current], scores[current]
                objects = objects[current] if objects is not None else None
            first = self.clips_seen[slots] == 0
            blended = r.smoothing * scores + (1 - r.smoothing) * self.smoothed[slots]
            self.smoothed[slots] = np.where(first[:, None], scores, blended)
            self.clips_seen[slots] += 1
            watched = self.smoothed[slots][:, r.interest]
            above = watched >= r.start_at
            self.streak[slots] = np.where(above, self.streak[slots] + 1, 0)
            starts = ~self.active[slots] & (self.streak[slots] >= r.min_clips)
            ends = self.active[slots] & (watched < r.end_below)
            events = [
                self._end_event(camera, int(slots[i]), int(k), ts, frame_index, "below_threshold", objects, int(i))
                for i, k in zip(*np.nonzero(ends), strict=True)
            ]
            active = self.active[slots]
            active[ends] = False
            active[starts] = True
            self.active[slots] = active
            since = self.active_since[slots]
            since[starts] = ts
            self.active_since[slots] = since
            for i, k in zip(*np.nonzero(starts), strict=True):
                label = int(r.interest[k])
                events.append(
                    Event(
                        "action.start",
                        camera,
                        ts,
                        frame_index,
                        object_payload(objects, int(i)) if objects is not None else None,
                        {"action": r.labels[label], "score": round(float(self.smoothed[slots[i], label]), 4)},
                    )
                )
            return events

    def release(
        self,
        camera: str,
        ts: float,
        frame_index: int,
        slots: np.ndarray,
        generations: np.ndarray,
        reason: str,
        sightings: Sequence[Detections | None],
    ) -> list[Event]:
        """These slots' tracks ended (`reason`): an `action.end` for each action still on, with the track's last
        sighting (`sightings[i]`, one detection, or None); the slots keep nothing of them."""
        with self.lock:
            current = self._current(slots, generations)
            events = [
                self._end_event(camera, int(slots[i]), int(k), ts, frame_index, reason, sightings[int(i)], 0)
                for i, k in zip(*np.nonzero(self.active[slots] & current[:, None]), strict=True)
            ]
            self.active[slots[current]] = False
            return events

    def _end_event(
        self,
        camera: str,
        slot: int,
        k: int,
        ts: float,
        frame_index: int,
        reason: str,
        objects: Detections | None,
        row: int,
    ) -> Event:
        """action.end of the `k`-th watched label of a slot in use."""
        label = int(self.rules.interest[k])
        return Event(
            "action.end",
            camera,
            ts,
            frame_index,
            object_payload(objects, row) if objects is not None else None,
            {
                "action": self.rules.labels[label],
                "score": round(float(self.smoothed[slot, label]), 4),
                "duration_s": round(ts - float(self.active_since[slot, k]), 3),
                "reason": reason,
            },
        )

    def top(self, slots: np.ndarray, generations: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The `k` best smoothed labels of these slots, for those with scores of their current track:
        (mask of those slots, (M, k) labels, (M, k) scores)."""
        with self.lock:
            has = (self.generation[slots] == generations) & (self.clips_seen[slots] > 0)
            smoothed = self.smoothed[slots[has]]
        best = np.argsort(-smoothed, axis=1)[:, :k]
        return has, self.label_names[best], np.take_along_axis(smoothed, best, axis=1)
