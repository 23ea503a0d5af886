"""The event journal (issue 19, first part): every event, with its snapshot, in an embedded SQLite database.

One database file in WAL mode (stdlib `sqlite3`), next to a `snapshots/` directory of JPEG files that rows refer to
by name (files, not BLOBs: the database stays small and a snapshot is served as it was sent). Rows hold the wire JSON
as published, and beside it the columns queries filter on, each indexed: `seq` (the key), `ts` (seconds since the
epoch), `camera` and `type` (with `ts`), `track` and `label` (from the event's object, where it has one).

- One writer: the journal is locked (`flock` on `<path>.lock`) for as long as it is open for writing, and a second
  opener gets `JournalLocked` naming the path and the holder's pid. Readers (`vigild events`) open the database
  read-only and never take the lock: WAL lets them read while the daemon writes.
- `write()` stores a batch in one transaction: its snapshot files first (written whole under a temporary name,
  then renamed), then the rows. A run killed between the two leaves files no row refers to; `open` sweeps them.
- `prune()` removes what retention says (older than `retention_days`; then, oldest first, what exceeds `max_bytes`,
  counted as database plus snapshots), rows and their files together, and gives the freed pages back to the file
  system (`auto_vacuum=INCREMENTAL`).

`JournalWriter` takes every event off the hot path and stores them on a thread of its own; a full disk costs the
journal those events (counted), never the live stream, and journaling resumes by itself.

The daemon puts every event on the writer as the publisher stamps it (vigild.outputs.publisher), so the journal
holds events in seq order whatever happens to the live PUB queue; vigild.outputs.replay serves them to resuming
subscribers and `vigild events` (vigild.outputs.history) reads them.

Where the files live, their modes, and what the start-up sweep may remove: vigild.outputs.journal_files. What
readers ask: vigild.outputs.journal_query. Both are importable from here.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vigild.lifecycle import ServiceThread
from vigild.outputs.journal_files import (
    DATABASE,
    SNAPSHOTS,
    JournalLocked,
    default_path,
    open_read_only,
    prepare_database,
    prepare_directories,
    snapshot_name,
    sweep,
    take_lock,
    write_file,
)
from vigild.outputs.journal_query import Query, epoch, select, select_text, where_clause
from vigild.outputs.journal_schema import SCHEMA, Record

if TYPE_CHECKING:
    from vigild.outputs.bus import Stamped

log = logging.getLogger("vigild.journal")

PRUNE_ROUNDS = 8
class Journal:
    def __init__(self, path: Path, retention_days: float = 30.0, max_bytes: int = 10 << 30):
        """Open the journal at `path` for writing, creating it and its directories owner-only (group-readable
        under the unit: vigild.outputs.journal_files); raise `JournalLocked` if another process has it open, OSError
        naming a file or directory it cannot use as its own."""
        self.path = Path(path)
        self.retention_days = retention_days
        self.max_bytes = max_bytes
        self.snapshots = prepare_directories(self.path)
        self._lock = take_lock(self.path)
        try:
            prepare_database(self.path)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # only takes on a new file: before any table
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last commits, never tear
            self._db.executescript(SCHEMA)
            self.swept = self._sweep()
        except BaseException:
            self._lock.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._lock.close()

    def last_seq(self) -> int:
        """The highest seq stored, 0 for an empty journal: the next run goes on from it."""
        row = self._db.execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0] or 0)

    def write(self, records: Sequence[Record]) -> None:
        """Store `records` in one transaction (their snapshot files first). On an error (a full disk, a seq stored
        already) nothing of the batch is stored, and the files this call wrote for it are removed."""
        written: list[Path] = []
        rows = []
        try:
            for r in records:
                name = None
                if r.jpeg is not None:
                    name = snapshot_name(r.seq, r.id)
                    if not (self.snapshots / name).exists():  # one that exists is a stored event's: left alone
                        write_file(self.snapshots / name, r.jpeg)
                        written.append(self.snapshots / name)
                jpeg_bytes = len(r.jpeg) if r.jpeg is not None else 0
                rows.append((r.seq, r.id, r.run, r.ts, r.camera, r.type, r.track, r.label, r.body.decode(), name,
                             jpeg_bytes))  # fmt: skip
            with self._transaction():
                self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except BaseException:
            for file in written:
                file.unlink(missing_ok=True)
            raise

    def prune(self, now: float | None = None) -> int:
        """Remove rows (and their snapshot files) older than `retention_days`, then the oldest until the journal
        (database plus snapshots) is within `max_bytes`; return how many rows went."""
        now = time.time() if now is None else now
        removed = self._remove("ts < ?", (now - self.retention_days * 86400,))
        for _ in range(PRUNE_ROUNDS):  # the rows' bytes leave out index pages: a round may fall a little short
            excess = self.size_bytes() - self.max_bytes
            if excess <= 0:
                break
            # the oldest rows whose stored bytes add up to the excess: a running sum over seq, in SQL
            row = self._db.execute(
                "SELECT seq FROM (SELECT seq, sum(length(body) + snapshot_bytes) OVER (ORDER BY seq) AS total "
                "FROM events) WHERE total >= ? ORDER BY seq LIMIT 1",
                (excess,),
            ).fetchone()
            gone = self._remove("seq <= ?", (row[0] if row is not None else self.last_seq(),))
            removed += gone
            self._db.execute("PRAGMA incremental_vacuum")
            if not gone:
                break
        if removed:
            self._db.execute("PRAGMA incremental_vacuum")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    def size_bytes(self) -> int:
        """The journal's size as the size cap counts it: the database's pages in use, plus the snapshot files."""
        (pages,) = self._db.execute("PRAGMA page_count").fetchone()
        (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
        (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
        (snapshots,) = self._db.execute("SELECT coalesce(sum(snapshot_bytes), 0) FROM events").fetchone()
        return int((pages - free) * page_size + snapshots)

    def query(self, query: Query) -> Iterator[dict[str, Any]]:
        """The stored events `query` selects, in seq order, as their wire JSON (dicts)."""
        yield from select(self._db, query)

    # ----- inside

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _remove(self, where: str, args: tuple[Any, ...]) -> int:
        """Delete the rows `where` selects, and then their snapshot files (a file whose row is gone is never
        served; a file left by a crash in between is swept at the next open)."""
        found = self._db.execute(f"SELECT snapshot FROM events WHERE {where} AND snapshot IS NOT NULL", args)
        names = [row[0] for row in found]
        with self._transaction():
            removed = self._db.execute(f"DELETE FROM events WHERE {where}", args).rowcount
        for name in names:
            (self.snapshots / name).unlink(missing_ok=True)
        return int(removed)

    def _sweep(self) -> int:
        """Remove snapshot files no row refers to (a run killed between writing them and committing their rows,
        or between deleting rows and their files) and temporary files; return how many. Only names the journal
        gives are touched (journal_files.sweep)."""
        known = {row[0] for row in self._db.execute("SELECT snapshot FROM events WHERE snapshot IS NOT NULL")}
        return sweep(self.snapshots, known)


QUEUE_MAX = 100_000
"""Events waiting for the journal at most (a disk slower than the events, for long): beyond, the oldest are not
journaled (counted), so memory stays bounded."""
RETRY_S = 5.0
PRUNE_INTERVAL_S = 60.0


class JournalWriter:
    """The journal's output: takes every event off the hot path (`feed` never blocks, whatever happens to the
    other outputs' queues) and stores them on a thread of its own, in batches, one transaction each; prunes by
    retention now and then.

    The bus offers each event the moment it stamps it, in seq order; the writer takes its wire JSON (built once,
    shared with the other outputs) on its own thread. A batch that cannot be stored (a full disk, an unwritable
    directory) is counted in `not_journaled` and given up, one clear error is logged and kept in `error`, and the
    next attempt waits `RETRY_S`: the events that come meanwhile are tried then, so journaling resumes by itself
    when space returns (logged). Events never journaled leave holes in the stored seq, which is how history and
    replay tell them from events never made: every seq up to `through` has been stored or given up."""

    id = "journal"
    heartbeats = False

    def __init__(self, journal: Journal, batch_max: int = 512, retry_s: float = RETRY_S,
                 prune_interval_s: float = PRUNE_INTERVAL_S):  # fmt: skip
        self.journal = journal
        self.batch_max = batch_max
        self.retry_s = retry_s
        self.prune_interval_s = prune_interval_s
        self._cond = threading.Condition()
        self._queue: deque[Record | Stamped] = deque()
        self._stopping = False
        self._busy = False
        self.stored = 0
        self.not_journaled = 0
        self.error: str | None = None
        self.through = journal.last_seq()
        """Every seq up to this one has been stored, or given up (counted in `not_journaled`)."""
        self._thread = ServiceThread("journal", self._loop)

    def start(self) -> None:
        self._thread.start()

    def put(self, record: Record) -> None:
        """Store `record` (its body already has `seq`, `id` and `run`)."""
        self._append(record)

    def feed(self, item: Stamped) -> None:
        """Store the event as the bus stamped it; cheap, never blocks."""
        self._append(item)

    def _append(self, item: Record | Stamped) -> None:
        with self._cond:
            self._queue.append(item)
            if len(self._queue) > QUEUE_MAX:
                self._queue.popleft()
                self.not_journaled += 1
            self._cond.notify_all()

    @property
    def database(self) -> Path:
        """The journal's database file (outputs that catch up read it, vigild.outputs.catchup)."""
        return self.journal.path

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being written."""
        with self._cond:
            return not self._queue and not self._busy

    @property
    def queued(self) -> int:
        return len(self._queue)

    def stop(self, timeout: float = 10.0) -> None:
        """Store what is queued (one attempt), then close the journal."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if not self._thread.stop(timeout):
            log.error("the journal writer did not finish in time: %d events not journaled", len(self._queue))
            return
        self.journal.close()

    def _loop(self, thread: ServiceThread) -> None:
        thread.ready()  # (the journal is open already)
        next_prune = time.monotonic()  # at start: what retention says went while the daemon was stopped
        retry_at = 0.0
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or time.monotonic() < retry_at):
                    wait = retry_at - time.monotonic() if self._queue else next_prune - time.monotonic()
                    self._cond.wait(max(0.01, wait))
                    if not self._queue and time.monotonic() >= next_prune:
                        break
                if self._stopping and not self._queue:
                    return
                count = min(len(self._queue), self.batch_max)
                batch = [self._queue.popleft() for _ in range(count)]
                self._busy = True
            records = self._records(batch)
            try:
                if records:
                    self.journal.write(records)
            except (sqlite3.Error, OSError, ValueError) as exc:
                retry_at = time.monotonic() + self.retry_s
                self._not_written(records, exc)
            else:
                with self._cond:
                    self.stored += len(records)
                if self.error is not None and records:
                    log.warning("the event journal %s is written again (%d events were not journaled)",
                                self.journal.path, self.not_journaled)  # fmt: skip
                    self.error = None
            if batch:  # the whole batch is dealt with, events whose JSON could not be built included
                last = batch[-1]
                self.through = max(self.through, last.seq)
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + self.prune_interval_s
                try:
                    self.journal.prune()
                except (sqlite3.Error, OSError) as exc:  # a full disk may not let it delete either
                    log.warning("cannot prune the event journal %s: %s", self.journal.path, exc)
            with self._cond:
                self._busy = False

    def _records(self, batch: list[Record | Stamped]) -> list[Record]:
        """The batch's records, off the hot path; an event whose JSON cannot be built is not journaled (counted),
        never the end of its batch."""
        records = []
        for item in batch:
            if isinstance(item, Record):
                records.append(item)
                continue
            try:
                records.append(Record.from_stamped(item))
            except ValueError as exc:
                log.warning("event seq=%d (%s) not journaled: %s", item.seq, item.event.type, exc)
                with self._cond:
                    self.not_journaled += 1
        return records

    def status(self) -> dict[str, Any]:
        """As an output (`outputs.journal`): its state, lag and what it could not store."""
        with self._cond:
            queued, oldest = len(self._queue), self._queue[0] if self._queue else None
        ts = oldest.ts if isinstance(oldest, Record) else oldest.event.ts_wall if oldest is not None else None
        return {"type": "JournalWriter", "state": "failed" if self.error else "running" if self._thread.alive
                else "stopped", "error": self.error, "delivered": self.stored, "last_seq": self.through,
                "lag_events": queued, "lag_s": round(max(0.0, time.time() - ts), 3) if ts is not None else 0.0,
                "drops": {"not_journaled": self.not_journaled} if self.not_journaled else {}}  # fmt: skip

    def _not_written(self, batch: list[Record], exc: BaseException) -> None:
        with self._cond:
            self.not_journaled += len(batch)
        if self.error is None:
            log.error("cannot write the event journal %s: %s; live events go on, journaling resumes when it can "
                      "(events not journaled are counted)", self.journal.path, exc)  # fmt: skip
        self.error = f"{type(exc).__name__}: {exc}"


__all__ = [
    "DATABASE",
    "SNAPSHOTS",
    "Journal",
    "JournalLocked",
    "JournalWriter",
    "Query",
    "Record",
    "default_path",
    "epoch",
    "open_read_only",
    "select",
    "select_text",
    "snapshot_name",
    "where_clause",
]
