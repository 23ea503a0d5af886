"""`vigild events`: the journal's history from the command line (issue 19). Light on purpose, like the other
clients: sqlite3 and the standard library only (no torch, OpenCV nor GStreamer).

It opens the journal read-only (WAL lets it read while the daemon writes) and prints the events a query selects, in
seq order: their wire JSON a line (the default), CSV or an aligned table; or, with `--count-by`, how many events
there are per value of the given fields (any top-level field of the events, such as `camera`, `type` or
`direction`, and `track` and `label` from their object), counted by SQLite.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from vigild.outputs.journal import Query, epoch, open_read_only, select, select_text, where_clause

RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
COLUMNS = ("seq", "ts", "camera", "type", "frame", "track", "label", "id", "run")
INDEXED = {"camera": "camera", "type": "type", "track": "track", "label": "label"}
FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class HistoryError(ValueError):
    """Input `vigild events` cannot take: the message says which and what was expected."""


def parse_time(text: str, now: float | None = None, option: str = "--since") -> float:
    """ISO 8601 (`2026-11-30T14:00`, `...Z`, an offset; without a zone, UTC) or relative to now (`15m`, `2h`,
    `1d`, `30s`): seconds since the epoch."""
    now = time.time() if now is None else now
    match = RELATIVE.match(text.strip())
    if match:
        return now - float(match.group(1)) * UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise HistoryError(
            f"{option} {text!r}: expected a time in ISO 8601 (2026-11-30T14:00:00Z) or a duration before now (15m, "
            "2h, 1d, 30s)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def count_fields(text: str) -> list[str]:
    fields = [name.strip() for name in text.split(",") if name.strip()]
    bad = [name for name in fields if not FIELD.match(name)]
    if not fields or bad:
        raise HistoryError(f"--count-by {text!r}: expected field names separated by commas, such as camera,type")
    return fields


def open_journal(path: Path) -> sqlite3.Connection:
    try:
        path.stat()
        readable = os.access(path, os.R_OK)
    except PermissionError:
        readable = False
    except OSError:
        raise HistoryError(f"no event journal at {path}") from None
    if not readable:
        raise HistoryError(
            f"cannot read the event journal {path}: permission denied (the installed service's journal is readable "
            "by members of its group: `sudo adduser $USER vigild`, then log in again)"
        )
    if not path.is_file():
        raise HistoryError(f"no event journal at {path}")
    try:
        db = open_read_only(path)
        db.execute("SELECT 1 FROM events LIMIT 1")
    except sqlite3.Error as exc:
        raise HistoryError(f"{path} is not a vigild event journal: {exc}") from None
    return db


def counts(db: sqlite3.Connection, query: Query, fields: Sequence[str]) -> list[dict[str, Any]]:
    """How many events `query` selects per combination of the values of `fields`, most first."""
    selected = ", ".join(INDEXED.get(name) or f"json_extract(body, '$.{name}')" for name in fields)
    where, args = where_clause(query)
    sql = f"SELECT {selected}, count(*) FROM events{where} GROUP BY {selected} ORDER BY count(*) DESC, {selected}"
    return [{**dict(zip(fields, row[:-1], strict=True)), "count": row[-1]} for row in db.execute(sql, args)]


def write(events: Iterable[dict[str, Any]], form: str, out: TextIO = sys.stdout) -> int:
    """Print `events` as `form` (json, csv, table); return how many."""
    count = 0
    if form == "json":
        for event in events:
            out.write(json.dumps(event, separators=(",", ":")) + "\n")
            count += 1
        return count
    rows = (_row(event) for event in events)
    if form == "csv":
        writer = csv.writer(out)
        writer.writerow([*COLUMNS, "data"])
        for row in rows:
            writer.writerow(row)
            count += 1
        return count
    table = [[*COLUMNS, "data"], *([str(v) if v is not None else "" for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + f"  {row[-1]}\n")
    return len(table) - 1


def write_counts(rows: list[dict[str, Any]], form: str, out: TextIO = sys.stdout) -> None:
    if form == "json":
        for row in rows:
            out.write(json.dumps(row, separators=(",", ":")) + "\n")
        return
    names = list(rows[0]) if rows else ["count"]
    if form == "csv":
        writer = csv.DictWriter(out, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
        return
    table = [names, *([str(row[name]) if row[name] is not None else "" for name in names] for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(names))]
    for line in table:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() + "\n")


def matches(query: Query, event: dict[str, Any]) -> bool:
    """`query`'s filters (its limit aside) applied to one event's wire JSON, as the journal's WHERE applies them to
    its rows: for `--follow`, whose live events never pass through SQLite."""
    obj = event.get("object") or {}
    ts = epoch(event["ts"]) if query.since is not None or query.until is not None else 0.0
    return (
        (query.camera is None or event.get("camera") == query.camera)
        and (not query.type_prefix or str(event.get("type", "")).startswith(query.type_prefix))
        and (query.since is None or ts >= query.since)
        and (query.until is None or ts < query.until)
        and (query.track is None or obj.get("track_id") == query.track)
        and (query.label is None or obj.get("label") == query.label)
        and (query.after_seq is None or event.get("seq", 0) > query.after_seq)
    )


def with_clips(db: sqlite3.Connection, bodies: Iterable[str], chunk: int = 500) -> Iterator[str]:
    """Stored bodies, each event that started or extended a clip with `"clip": {id, state, path, duration_s}` added
    at its end (from the journal's side table: the event as published is unchanged); the others as they are."""
    from vigild.outputs.clip_store import clips_of_events, has_clip_tables

    if not has_clip_tables(db):
        yield from bodies
        return
    batch: list[str] = []
    for body in bodies:
        batch.append(body)
        if len(batch) >= chunk:
            yield from _annotated(db, batch, clips_of_events)
            batch = []
    yield from _annotated(db, batch, clips_of_events)


_SEQ = re.compile(r'"seq":(\d+)')


def _annotated(db: sqlite3.Connection, batch: list[str], clips_of_events: Any) -> Iterator[str]:
    seqs = [int(m.group(1)) if (m := _SEQ.search(body[:64])) else -1 for body in batch]
    found = clips_of_events(db, [s for s in seqs if s >= 0])
    for seq, body in zip(seqs, batch, strict=True):
        clip = found.get(seq)
        if clip is None or not body.endswith("}"):
            yield body
        else:
            yield body[:-1] + ',"clip":' + json.dumps(clip.brief(), separators=(",", ":")) + "}"


def last_seq(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])


def _row(event: dict[str, Any]) -> list[Any]:
    obj = event.get("object") or {}
    data = {k: v for k, v in event.items() if k not in ("schema", "seq", "ts", "camera", "type", "frame", "id", "run")}
    return [event.get("seq"), event.get("ts"), event.get("camera"), event.get("type"), event.get("frame"),
            obj.get("track_id"), obj.get("label"), event.get("id"), event.get("run"),
            json.dumps(data, separators=(",", ":"))]  # fmt: skip


__all__ = ["HistoryError", "count_fields", "counts", "last_seq", "matches", "open_journal", "parse_time", "select",
           "select_text", "with_clips", "write", "write_counts"]  # fmt: skip
