"""What readers ask of the event journal (vigild.outputs.journal): a `Query`, turned into SQL over its indexed
columns; `vigild events` (vigild.outputs.history), the replay socket and `Journal.query` share it."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Query:
    """What `Journal.query` selects; every field narrows it, None or empty leaves it open."""

    camera: str | None = None
    type_prefix: str | None = None
    """`zone.` selects zone.enter and zone.exit; a full type selects that type."""
    since: float | None = None
    until: float | None = None
    """Seconds since the epoch: since <= ts < until."""
    track: int | None = None
    label: str | None = None
    after_seq: int | None = None
    limit: int | None = None
    before_seq: int | None = None
    newest_first: bool = False
    """Descending seq order (a timeline's pages: `before_seq` the last page's oldest)."""


def epoch(iso: str) -> float:
    """The wire format's `ts` (ISO 8601, UTC, `Z`) as seconds since the epoch."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def where_clause(query: Query) -> tuple[str, list[Any]]:
    """The WHERE clause (with its arguments) of the rows `query` selects, its limit aside."""
    clauses, args = [], []
    for column, op, value in (
        ("camera", "=", query.camera),
        ("ts", ">=", query.since),
        ("ts", "<", query.until),
        ("track", "=", query.track),
        ("label", "=", query.label),
        ("seq", ">", query.after_seq),
        ("seq", "<", query.before_seq),
    ):
        if value is not None:
            clauses.append(f"{column} {op} ?")
            args.append(value)
    if query.type_prefix:
        # a range on the type (the index serves it), not LIKE: `_` and `%` in a type are not wildcards
        clauses.append("type >= ? AND type < ?")
        args += [query.type_prefix, query.type_prefix + "\U0010ffff"]
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def select_text(db: sqlite3.Connection, query: Query) -> Iterator[str]:
    """The wire JSON, as stored (compact, as published), of the events `query` selects from the journal's database
    `db`, in seq order (descending with `newest_first`)."""
    where, args = where_clause(query)
    sql = f"SELECT body FROM events{where} ORDER BY seq" + (" DESC" if query.newest_first else "")
    if query.limit is not None:
        sql += " LIMIT ?"
        args.append(query.limit)
    for (body,) in db.execute(sql, args):
        yield body


def select(db: sqlite3.Connection, query: Query) -> Iterator[dict[str, Any]]:
    """The events `query` selects from the journal's database `db`, in seq order."""
    return (json.loads(body) for body in select_text(db, query))


def missing_ranges(after: int, through: int, seqs: list[int], oldest: int | None) -> list[dict[str, Any]]:
    """The ranges of (after, through] that `seqs` (ascending) leaves out, each with its reason: below the oldest
    stored seq, retention removed it; above, the journal never stored it. The replay socket's `missing` and the
    gap notices of outputs that catch up from the journal."""
    ranges = []
    expected = after + 1
    for seq in [*seqs, through + 1]:
        if seq > expected:
            ranges.append((expected, seq - 1))
        expected = seq + 1
    missing = []
    for first, last in ranges:
        if oldest is not None and first < oldest:
            cut = min(last, oldest - 1)
            missing.append({"first": first, "last": cut, "reason": "retention"})
            first = cut + 1
        if first <= last:
            missing.append({"first": first, "last": last, "reason": "not_journaled"})
    return missing


__all__ = ["Query", "epoch", "missing_ranges", "select", "select_text", "where_clause"]
