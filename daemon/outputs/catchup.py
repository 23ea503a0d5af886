"""Outputs that lose nothing across their own stops: fed from the journal after a cursor, then live, in order.

An output that catches up keeps a cursor: the seq of the last event it delivered, stored in the journal's database
under the output's id (table `output_cursors`), so that it follows the journal it belongs to. Before it delivers a
live event `s` it makes sure it has delivered everything up to `s - 1`: what it missed (it was stopped, removed by a
reload, or its queue ran over) it reads from the journal, in seq order, and where the journal has nothing (removed
by retention, or never stored) it delivers a gap notice instead (`gap(first, last, reason)`). With nothing live to
deliver it catches up on its own, up to what the journal has stored. A new id starts with the first live event.

Without the journal (`journal.enabled: false`, or a journal that could not be opened) there is nothing to catch up
from: a stop loses what comes meanwhile, and a queue that runs over drops (counted: `queue_full`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vigild.outputs.base import QueuedOutput
from vigild.outputs.bus import Stamped
from vigild.outputs.journal_files import uri
from vigild.outputs.journal_query import missing_ranges

log = logging.getLogger("vigild.outputs")

PAGE_EVENTS = 500
JOURNAL_WAIT_S = 10.0
"""How long an output waits for the journal to store what it needs before it gives it up as a gap."""
POLL_S = 0.05


class JournalLink(Protocol):
    """What a catching-up output needs of the journal's writer (vigild.outputs.journal.JournalWriter)."""

    @property
    def database(self) -> Path: ...

    @property
    def through(self) -> int:
        """Every seq up to this one is stored, or given up."""
        ...


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event on its way out: its seq, topic (`vigild.<camera>.<type>`) and wire JSON as published."""

    seq: int
    topic: str
    body: bytes
    snapshot: bytes | None = None
    """Its snapshot's JPEG, live events only (the journal's pages carry none)."""
    event_id: str = ""
    run: str = ""
    """The run that made it (the bus's), not necessarily this one: a catch-up delivers an earlier run's events."""


class Cursor:
    """An output's place in the journal, read and written on a connection of the output's own."""

    def __init__(self, database: Path, output_id: str):
        self.output_id = output_id
        self._db = sqlite3.connect(uri(database, "rw"), uri=True, timeout=30, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
        self._lock = threading.Lock()
        """The output's thread and the status (another thread) share the connection."""

    def load(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT seq FROM output_cursors WHERE output = ?", (self.output_id,)).fetchone()
        return int(row[0]) if row is not None else None

    def store(self, seq: int) -> None:
        with self._lock:
            self._db.execute("INSERT INTO output_cursors VALUES (?, ?, ?) ON CONFLICT (output) DO UPDATE SET "
                             "seq = excluded.seq, updated = excluded.updated", (self.output_id, seq, time.time()))  # fmt: skip

    def ts_after(self, seq: int) -> float | None:
        """The wall time of the first stored event after `seq` (the oldest one not delivered), if any."""
        with self._lock:
            row = self._db.execute("SELECT ts FROM events WHERE seq > ? ORDER BY seq LIMIT 1", (seq,)).fetchone()
        return float(row[0]) if row is not None else None

    def read(self, after: int, upper: int) -> tuple[list[Delivery], list[dict[str, Any]], int]:
        """The stored events of (after, upper], at most a page: (events, missing ranges, the seq the page ends at)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, camera, type, body, id, run FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (after, upper, PAGE_EVENTS),
            ).fetchall()
            oldest = self._db.execute("SELECT min(seq) FROM events").fetchone()[0]
        through = rows[-1][0] if len(rows) == PAGE_EVENTS else upper
        events = [Delivery(seq, f"vigild.{camera}.{kind}", body.encode(), None, event_id, run)
                  for seq, camera, kind, body, event_id, run in rows]  # fmt: skip
        return events, missing_ranges(after, through, [d.seq for d in events], oldest), through

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()


class CatchUpOutput(QueuedOutput):
    """A `QueuedOutput` that catches up from the journal (see the module). A subclass provides `send` and `gap`,
    and may override `flush` (called after each batch, before the cursor is stored, which it may hold back)."""

    def __init__(self, output_id: str, queue_size: int, journal: JournalLink | None):
        super().__init__(output_id, queue_size)
        self.journal = journal
        self.cursor: int | None = None
        self.from_journal = 0
        """Events delivered from the journal (missed while stopped, or when the queue ran over)."""
        self.gaps = 0
        self.stored: int | None = None
        """The cursor as stored: everything up to it is delivered (for MQTT: acknowledged by the broker)."""
        self.heartbeat: Stamped | None = None
        """The latest heartbeat not yet taken, for an output with `heartbeats = True`."""
        self._cursor: Cursor | None = None

    # ----- what a subclass provides

    def send(self, deliveries: list[Delivery]) -> None:
        raise NotImplementedError

    def gap(self, first: int, last: int, reason: str) -> None:
        """Seqs `first`..`last` cannot be delivered: the journal has none of them (`retention`, `not_journaled`),
        or there is no journal to read them from (`queue_full`, `stopped`)."""
        raise NotImplementedError

    def flush(self) -> bool:
        """Make what was sent durable (called before the cursor moves past it); False: it is not (the output is
        stopping first), and the stored cursor stays where it was."""
        return True

    # ----- inside

    def feed(self, item: Stamped) -> None:
        if item.event.is_heartbeat:  # with `heartbeats = True`: the latest only, never caught up (a seq of its own)
            self.heartbeat = item
            return
        with self._cond:
            if len(self._queue) >= self.queue_size:
                if self.journal is None:
                    self.drops["queue_full"] += 1
                return  # with a journal: read from it when its turn comes
            self._queue.append(item)
            self._cond.notify()

    def open(self) -> None:
        if self.journal is not None:
            self._cursor = Cursor(self.journal.database, self.id)
            self.cursor = self.stored = self._cursor.load()

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()

    def tick(self) -> None:
        """Nothing live waiting: catch up with what the journal holds."""
        if self.journal is not None and self.cursor is not None and not self.queued:
            through = self.journal.through
            if through > self.cursor:
                self._fill(through)
                self._commit()

    def deliver(self, batch: list[Stamped]) -> None:
        if self.cursor is None and batch and self._cursor is not None:
            # a new id: it starts here, stored at once, so that a restart before the first batch is confirmed
            # (a broker that never answered) still catches up from here
            self.cursor = self.stored = batch[0].seq - 1
            self._cursor.store(self.cursor)
        live: list[Delivery] = []
        for item in batch:
            if self.cursor is not None and item.seq <= self.cursor:
                continue  # delivered from the journal already
            try:
                snapshot = item.event.snapshot
                delivery = Delivery(item.seq, item.event.topic, item.wire(), snapshot.jpeg if snapshot else None,
                                    item.id, item.run)  # fmt: skip
            except ValueError:
                self.drop("unsendable")
                continue
            if self.cursor is not None and item.seq > self.cursor + 1:
                self._send(live)
                live = []
                self._fill(item.seq - 1)
            live.append(delivery)
            self.cursor = item.seq
        self._send(live)
        self._commit()

    def _send(self, deliveries: list[Delivery]) -> None:
        if deliveries:
            self.send(deliveries)
            self.delivered += len(deliveries)

    def _commit(self) -> None:
        if self.flush() and self._cursor is not None and self.cursor is not None:
            self._cursor.store(self.cursor)
            self.stored = self.cursor

    def _fill(self, until: int) -> None:
        """Deliver (cursor, until] from the journal, gap notices where it has nothing; the cursor ends at `until`."""
        assert self.cursor is not None
        if self.journal is None or self._cursor is None:
            self._gap(self.cursor + 1, until, "queue_full")
            self.cursor = until
            return
        deadline = time.monotonic() + JOURNAL_WAIT_S
        while self.cursor < until:
            upper = min(until, self.journal.through)
            if upper <= self.cursor:
                if time.monotonic() > deadline:
                    log.error("output %s: the journal has not stored seq %d..%d within %.0f s; delivered as a gap",
                              self.id, self.cursor + 1, until, JOURNAL_WAIT_S)  # fmt: skip
                    self._gap(self.cursor + 1, until, "not_journaled")
                    self.cursor = until
                    return
                time.sleep(POLL_S)  # the journal's writer is a moment behind the bus
                continue
            events, missing, through = self._cursor.read(self.cursor, upper)
            self._merge(events, missing)
            self.from_journal += len(events)
            self.cursor = through
            self._commit()  # page by page: a long backlog never waits in memory whole
            deadline = time.monotonic() + JOURNAL_WAIT_S

    def _merge(self, events: list[Delivery], missing: list[dict[str, Any]]) -> None:
        """Send `events` and the gap notices of `missing`, in seq order."""
        pending = list(events)
        for hole in missing:
            self._send([d for d in pending if d.seq < hole["first"]])
            pending = [d for d in pending if d.seq > hole["last"]]
            self._gap(hole["first"], hole["last"], hole["reason"])
        self._send(pending)

    def _gap(self, first: int, last: int, reason: str) -> None:
        self.gaps += 1
        self.gap(first, last, reason)

    def status(self) -> dict[str, Any]:
        status = super().status()
        status.update(cursor=self.stored if self.journal is not None else self.cursor, from_journal=self.from_journal, gaps=self.gaps,
                      catch_up=self.journal is not None)  # fmt: skip
        cursor, stored = self._cursor, self.stored
        if cursor is not None and stored is not None:  # behind: the oldest event not confirmed yet is in the journal
            with contextlib.suppress(sqlite3.Error):
                ts = cursor.ts_after(stored)
                if ts is not None:
                    status["lag_s"] = max(status["lag_s"], round(max(0.0, time.time() - ts), 3))
        return status
