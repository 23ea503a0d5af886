"""The recordings' side tables in the journal's database (`clips`, `clip_events`: vigild.outputs.journal_schema):
written by the daemon's recording (vigild.recording), read by `vigild events`, `vigild clip` and the web console.

The recording writes through a connection of its own (WAL: the journal writer and it take turns, each transaction
short); readers open the database read-only like every other reader of the journal.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vigild.outputs.journal_files import open_read_only
from vigild.outputs.journal_schema import SCHEMA

BUSY_TIMEOUT_MS = 10_000
LIVE = ("pending", "writing")
"""States of a clip that is not finished: never removed by retention."""


@dataclass(frozen=True)
class ClipRow:
    id: str
    camera: str
    root: str
    path: str
    state: str
    segment: bool
    run: str
    created: float
    retain_until: float
    start_ts: float | None
    end_ts: float | None
    frames: int
    bytes: int
    codec: str | None
    width: int | None
    height: int | None
    reason: str | None
    error: str | None
    ref: bool = False
    """A reference into the camera's continuous segments (its `path` is empty until it is exported)."""

    @property
    def file(self) -> Path:
        return Path(self.root) / self.path

    def checked_file(self) -> Path:
        """`file`, or ValueError when its path would leave its root (a database someone edited)."""
        root = Path(self.root).resolve()
        target = (root / self.path).resolve()
        if not target.is_relative_to(root) or target == root:
            raise ValueError(f"clip {self.id}: its path {self.path!r} leaves the recordings root {self.root}")
        return target

    def brief(self) -> dict[str, Any]:
        """What `vigild events` adds to an event that has a clip."""
        return {"id": self.id, "state": self.state, "path": self.path, "duration_s": self.duration_s,
                "codec": self.codec}

    @property
    def duration_s(self) -> float | None:
        if self.start_ts is None or self.end_ts is None:
            return None
        return round(self.end_ts - self.start_ts, 3)

    def describe(self) -> dict[str, Any]:
        """As `vigild events --json` and the console show it."""
        return {"id": self.id, "camera": self.camera, "path": self.path, "state": self.state,
                "start_ts": self.start_ts, "end_ts": self.end_ts, "duration_s": self.duration_s,
                "bytes": self.bytes, "codec": self.codec, "width": self.width, "height": self.height,
                "reason": self.reason, "error": self.error}  # fmt: skip


_COLUMNS = ", ".join(ClipRow.__dataclass_fields__)


def _row(values: Sequence[Any]) -> ClipRow:
    fields = list(values)
    fields[5] = bool(fields[5])
    fields[18] = bool(fields[18])
    return ClipRow(*fields)


class ClipStore:
    """The daemon's writing connection to the side tables."""

    def __init__(self, database: Path):
        self._db = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL (the journal set it): a power cut may lose the last rows
        self._db.executescript(SCHEMA)  # (the journal made them already; a journal from before recordings had none)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def add(self, clip_id: str, camera: str, root: Path, path: str, run: str, retain_until: float, *,
            segment: bool = False, ref: bool = False, links: Sequence[tuple[int, str, str]] = ()) -> None:  # fmt: skip
        """A clip ordered (`pending`), with the events that started it: `(seq, event id, role)`."""
        with self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO clips (id, camera, root, path, state, segment, run, created, retain_until, "
                "ref) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                (clip_id, camera, str(root), path, int(segment), run, time.time(), retain_until, int(ref)),
            )
            self._link(clip_id, links)

    def link(self, clip_id: str, links: Sequence[tuple[int, str, str]], retain_until: float) -> None:
        """More events for a clip (a trigger that extended it); it is kept at least until `retain_until`."""
        with self._transaction():
            self._link(clip_id, links)
            self._db.execute("UPDATE clips SET retain_until = max(retain_until, ?) WHERE id = ?",
                             (retain_until, clip_id))  # fmt: skip

    def _link(self, clip_id: str, links: Sequence[tuple[int, str, str]]) -> None:
        self._db.executemany("INSERT OR IGNORE INTO clip_events VALUES (?, ?, ?, ?)",
                             [(clip_id, seq, event_id, role) for seq, event_id, role in links])  # fmt: skip

    def update(self, clip_id: str, **values: Any) -> None:
        if not values:
            return
        assignments = ", ".join(f"{name} = ?" for name in values)
        if not set(values) <= set(ClipRow.__dataclass_fields__):
            raise ValueError(f"not columns of clips: {sorted(set(values) - set(ClipRow.__dataclass_fields__))}")
        with self._transaction():
            self._db.execute(f"UPDATE clips SET {assignments} WHERE id = ?", (*values.values(), clip_id))

    def get(self, clip_id: str) -> ClipRow | None:
        found = self._db.execute(f"SELECT {_COLUMNS} FROM clips WHERE id = ?", (clip_id,)).fetchone()
        return _row(found) if found else None

    def events_of(self, clip_id: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT event_id FROM clip_events WHERE clip = ? ORDER BY seq",
                                                (clip_id,))]  # fmt: skip

    def unfinished(self, run: str) -> list[ClipRow]:
        """Clips an earlier run left `pending` or `writing` (it was killed, or stopped before they ended)."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM clips WHERE state IN {LIVE} AND run != ?", (run,))
        return [_row(r) for r in rows]

    def expired(self, now: float) -> list[ClipRow]:
        """Saved clips past their retention, oldest first."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM clips WHERE state = 'saved' AND retain_until < ? "
                                "ORDER BY created", (now,))  # fmt: skip
        return [_row(r) for r in rows]

    def oldest_saved(self, limit: int) -> list[ClipRow]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM clips WHERE state = 'saved' ORDER BY "
                                "coalesce(start_ts, created) LIMIT ?", (limit,))  # fmt: skip
        return [_row(r) for r in rows]

    def segments_between(self, camera: str, start_ts: float, end_ts: float) -> list[ClipRow]:
        """`camera`'s continuous segments (any state) that overlap [start_ts, end_ts], oldest first."""
        return segments_between(self._db, camera, start_ts, end_ts)

    def references_into(self, segment: ClipRow) -> list[ClipRow]:
        """Saved reference clips (without a file of their own) that `segment` holds part of."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM clips WHERE ref = 1 AND path = '' AND state = 'saved' AND camera = ? AND "
            "start_ts <= ? AND end_ts >= ?", (segment.camera, segment.end_ts or 0, segment.start_ts or 0)
        )  # fmt: skip
        return [_row(r) for r in rows]

    def open_references(self) -> list[ClipRow]:
        """Reference clips waiting for their segments to be saved."""
        return [_row(r) for r in self._db.execute(f"SELECT {_COLUMNS} FROM clips WHERE ref = 1 AND state = 'writing'")]

    def saved_bytes(self) -> int:
        (total,) = self._db.execute("SELECT coalesce(sum(bytes), 0) FROM clips WHERE state = 'saved'").fetchone()
        return int(total)

    def known_paths(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT path FROM clips WHERE state IN ('pending', 'writing', 'saved')")}

    def counts(self) -> dict[str, int]:
        return {state: int(n) for state, n in self._db.execute("SELECT state, count(*) FROM clips GROUP BY state")}


EXPORTS = ".exports"


def exported_file(root: Path | str, clip_id: str) -> Path:
    """Where a reference clip (a window of continuous segments) is exported to be played or copied out."""
    return Path(root) / EXPORTS / f"{clip_id}.mp4"


def export_relative(clip_id: str) -> str:
    return f"{EXPORTS}/{clip_id}.mp4"


# ----- readers (`vigild events`, `vigild clip`, the console): a read-only connection


def clip_of_event(db: sqlite3.Connection, event: str | int) -> ClipRow | None:
    """The clip of an event (by its id, or its seq): the newest clip it started or extended; None if it has none."""
    column = "seq" if isinstance(event, int) else "event_id"
    found = db.execute(
        f"SELECT {', '.join('c.' + c for c in ClipRow.__dataclass_fields__)} FROM clip_events e "
        f"JOIN clips c ON c.id = e.clip WHERE e.{column} = ? ORDER BY c.created DESC LIMIT 1", (event,)
    ).fetchone()  # fmt: skip
    return _row(found) if found else None


def clips_of_events(db: sqlite3.Connection, seqs: Sequence[int]) -> dict[int, ClipRow]:
    """The clip of each of these events that has one, by seq (one query, for a page of history)."""
    if not seqs:
        return {}
    marks = ", ".join("?" * len(seqs))
    rows = db.execute(
        f"SELECT e.seq, {', '.join('c.' + c for c in ClipRow.__dataclass_fields__)} FROM clip_events e "
        f"JOIN clips c ON c.id = e.clip WHERE e.seq IN ({marks}) ORDER BY c.created", list(seqs)
    ).fetchall()  # fmt: skip
    return {int(r[0]): _row(r[1:]) for r in rows}


def clip_by_id(db: sqlite3.Connection, clip_id: str) -> ClipRow | None:
    found = db.execute(f"SELECT {_COLUMNS} FROM clips WHERE id = ?", (clip_id,)).fetchone()
    return _row(found) if found else None


def segments_between(db: sqlite3.Connection, camera: str, start_ts: float, end_ts: float) -> list[ClipRow]:
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM clips WHERE segment = 1 AND camera = ? AND start_ts <= ? AND "
        "coalesce(end_ts, 1e18) >= ? ORDER BY start_ts", (camera, end_ts, start_ts)
    )  # fmt: skip
    return [_row(r) for r in rows]


def has_clip_tables(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'clips'").fetchone() is not None


def open_reader(database: Path) -> sqlite3.Connection:
    return open_read_only(database)
