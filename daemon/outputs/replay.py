"""The replay socket: a resuming subscriber asks for the events after a seq and gets them from the journal, in pages.

ZeroMQ's Clone pattern (the guide, chapter 5): the live stream is PUB/SUB and may drop; a subscriber that sees a gap
in `seq` asks this ROUTER for what it missed and merges it by seq. One request, one reply:

- request `[b"", json]`: `{"after_seq": N, "until_seq": M (optional), "limit": L (optional)}`;
- reply `[b"", header, body, jpeg, body, jpeg, ...]`: each event's wire JSON as it was published and its snapshot's
  JPEG (empty when it has none or the file went with retention). The header says what the page covers:
  `{"through": T, "events": K, "missing": [{"first": a, "last": b, "reason": r}], "journaled_through": J,
  "last_seq": S, "run": R}`. Every seq in `(N, T]` is either in the page or in `missing`: `reason` is
  `"retention"` (removed by age or size) or `"not_journaled"` (the journal could not store it). Seqs after `T` are
  for the next page (the page was full) or not journaled yet (`T` = `J`, the writer's progress): ask again.
  A request that is not understood gets `{"error": "..."}`.

Pages are bounded by events (`PAGE_EVENTS`) and bytes (`PAGE_BYTES`). Reads use a connection of the replay thread's
own: SQLite's WAL lets them run beside the writer, and seeing `journaled_through` before reading means every seq up
to it is committed or given up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from vigild.config.settings import CurveConfig
from vigild.outputs.journal import SNAPSHOTS, JournalWriter, open_read_only

log = logging.getLogger("vigild.replay")

PAGE_EVENTS = 500
PAGE_BYTES = 8 << 20
POLL_MS = 200
MAX_REQUEST_BYTES = 4096
"""A request is a small JSON object: ZeroMQ disconnects a peer that sends a larger frame."""
RECEIVE_HWM = 16
MAX_SEQ = (1 << 63) - 1
"""SQLite's largest integer: a seq beyond it cannot be asked for."""


class ReplayError(Exception):
    pass


class ReplayServer:
    def __init__(
        self,
        endpoint: str,
        writer: JournalWriter | None,
        last_seq: Callable[[], int],
        curve: CurveConfig | None = None,
    ):
        """`writer`: the journal's (None: the journal could not be opened, and every event is `not_journaled`);
        `last_seq`: the publisher's last stamped seq."""
        self.endpoint = endpoint
        self.writer = writer
        self._last_seq = last_seq
        self.curve_config = curve
        self.curve: Any = None
        self._context = zmq.Context()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._bind_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="replay", daemon=True)

    def start(self) -> None:
        from vigild.outputs.publisher import is_loopback_endpoint

        if not is_loopback_endpoint(self.endpoint) and self.curve_config is None:
            log.warning(
                "INSECURE: the replay socket binds %s, which is reachable from other machines, without CURVE: anyone "
                "who can connect can read the event journal; bind to 127.0.0.1 or configure `curve:`",
                self.endpoint,
            )
        self._thread.start()
        self._bound.wait()
        if self._bind_error is not None:
            self._thread.join()
            raise ReplayError(f"cannot bind the replay socket to {self.endpoint}: {self._bind_error}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        socket = self._context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        socket.setsockopt(zmq.SNDHWM, 16)  # a reply is a page: few at a time per client
        socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a client that left: its reply is dropped, never blocks
        from vigild.service.curve import bind_secured

        try:
            self.curve = bind_secured(socket, self.endpoint, self.curve_config, self._context)
        except (zmq.ZMQError, OSError, ValueError) as exc:
            self._bind_error = str(exc)
            self._context.term()
            self._bound.set()
            return
        self._bound.set()
        database: sqlite3.Connection | None = None
        try:
            while not self._stop.is_set():
                if not socket.poll(POLL_MS):
                    continue
                identity, *frames = socket.recv_multipart()
                if database is None and self.writer is not None:
                    database = open_read_only(self.writer.journal.path)
                try:
                    reply = self.answer(database, json.loads(frames[-1]))
                except (ValueError, TypeError, KeyError, IndexError) as exc:
                    reply = [json.dumps({"error": f"not a replay request: {exc}"}).encode()]
                except sqlite3.Error as exc:
                    log.warning("replay: cannot read the journal: %s", exc)
                    reply = [json.dumps({"error": f"cannot read the journal: {exc}"}).encode()]
                with contextlib.suppress(zmq.Again):  # that client is not reading: it asks again
                    socket.send_multipart([identity, b"", *reply], flags=zmq.NOBLOCK)
        finally:
            if database is not None:
                database.close()
            socket.close()
            if self.curve is not None:
                self.curve.stop()
            self._context.term()

    def answer(self, database: sqlite3.Connection | None, request: dict[str, Any]) -> list[bytes]:
        after = _seq(request["after_seq"])
        until = _seq(request["until_seq"]) if request.get("until_seq") is not None else None
        limit = max(1, min(_seq(request.get("limit", PAGE_EVENTS)), PAGE_EVENTS))
        last_seq = self._last_seq()
        # read before the rows: every seq up to it is committed (or given up) by now; no journal this run (no
        # database): nothing was stored
        journaled = self.writer.through if self.writer is not None and database is not None else last_seq
        upper = journaled if until is None else min(until, journaled)
        rows: list[tuple[int, str, str | None]] = []
        oldest = None
        if database is not None:
            rows = database.execute(
                "SELECT seq, body, snapshot FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                (after, upper, limit),
            ).fetchall()
            oldest = database.execute("SELECT min(seq) FROM events").fetchone()[0]
        parts: list[bytes] = []
        size = 0
        kept = 0
        for _, body, snapshot in rows:
            jpeg = self._snapshot(snapshot)
            parts += [body.encode(), jpeg]
            size += len(body) + len(jpeg)
            kept += 1
            if size >= PAGE_BYTES:
                break
        full = kept < len(rows) or len(rows) == limit  # more may follow: this page ends at its last event
        rows = rows[:kept]
        through = rows[-1][0] if full else max(upper, after)
        header = {
            "after_seq": after,
            "through": through,
            "events": kept,
            "missing": _missing(after, through, [row[0] for row in rows], oldest),
            "journaled_through": journaled,
            "last_seq": last_seq,
            "run": self.writer.run if self.writer is not None else None,
        }
        return [json.dumps(header).encode(), *parts]

    def _snapshot(self, name: str | None) -> bytes:
        if name is None or self.writer is None:
            return b""
        try:
            return (Path(self.writer.journal.path).parent / SNAPSHOTS / name).read_bytes()
        except OSError:
            return b""  # removed by retention since the row was read


def _seq(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQ:
        raise ValueError(f"expected a seq (an integer from 0 to {MAX_SEQ}), got {str(value)[:40]!r}")
    return value


def _missing(after: int, through: int, seqs: list[int], oldest: int | None) -> list[dict[str, Any]]:
    """The ranges of (after, through] that `seqs` (ascending) leaves out, each with its reason: below the oldest
    stored seq, retention removed it; above, the journal never stored it."""
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

