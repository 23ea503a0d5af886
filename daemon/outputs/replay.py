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
  A request that is not understood gets `{"error": "...", "code": "bad_request"}`; one that fails on the way
  (a bug, a journal that cannot be read) `{"error": ..., "code": "internal"}`: nothing a client sends ends the
  thread. A thread that dies anyway is served again (`restarts` in the status, journal.replay_restarts).

Memory is bounded by construction (docs/events.md#what-the-replay-socket-may-hold): at most `MAX_PEERS` clients are
served at once (a client holds its place from its first request until it disconnects: the socket monitor says so);
another one gets `{"code": "busy"}` (counted: `refused`) and nothing else. ZeroMQ queues at most `SEND_HWM` replies
per client and its I/O thread holds one more while it writes, and a page is at most `PAGE_BYTES` (bodies and
snapshots; a single event larger than that goes alone): `MAX_PEERS * (SEND_HWM + 1) * PAGE_BYTES` = 32 MiB for the
pages, plus a busy reply per refused connection. Reads use a connection of the replay thread's own: SQLite's WAL
lets them run beside the writer, and seeing `journaled_through` before reading means every seq up to it is
committed or given up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket as pysocket
import sqlite3
import threading
from pathlib import Path
from typing import Any, Protocol

import zmq
from zmq.utils.monitor import parse_monitor_message

from vigild import paths
from vigild.config.settings import CurveConfig
from vigild.lifecycle import ServiceThread, StartError
from vigild.outputs.journal import SNAPSHOTS, JournalWriter, open_read_only
from vigild.outputs.journal_query import missing_ranges

log = logging.getLogger("vigild.replay")

PAGE_EVENTS = 500
PAGE_BYTES = 1 << 20
"""Bodies and snapshots of one reply page (a single event larger than this goes alone)."""
MAX_PEERS = 16
"""Clients served at once; more get a `busy` reply."""
SEND_HWM = 1
"""Replies ZeroMQ queues per client (a client asks for one page at a time)."""
POLL_MS = 200
MAX_REQUEST_BYTES = 4096
"""A request is a small JSON object: ZeroMQ disconnects a peer that sends a larger frame."""
MAX_FRAMES_KEPT = 3
"""Of one request: the routing identity, the empty delimiter and the JSON; further frames are read and dropped."""
RECEIVE_HWM = 4
RESTART_DELAY_S = 0.5
MAX_SEQ = (1 << 63) - 1
"""SQLite's largest integer: a seq beyond it cannot be asked for."""
SOCKET_MODE = 0o660
"""An ipc replay socket: the daemon's user and group may connect (connecting needs write permission)."""


class ReplayError(Exception):
    pass


class Stamping(Protocol):
    """What the replay header tells of the live stream (vigild.outputs.bus.EventBus)."""

    run: str

    @property
    def last_seq(self) -> int: ...


class Peers:
    """The clients being served, by routing identity, each with the connection (file descriptor) it came on: a
    place is freed when the socket monitor reports that connection closed. At most `limit` places."""

    def __init__(self, limit: int):
        self.limit = limit
        self._by_fd: dict[int, bytes] = {}
        self._fd_of: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._fd_of)

    def admit(self, identity: bytes, fd: int) -> bool:
        """True when `identity` is served (already, or now given a place)."""
        if self._fd_of.get(identity) == fd:
            return True
        self.drop(identity)  # the same identity on a new connection: its old place goes
        stale = self._by_fd.get(fd)  # that descriptor's last connection closed: its close not read yet
        if stale is not None:
            self.drop(stale)
        if len(self._fd_of) >= self.limit:
            return False
        self._by_fd[fd], self._fd_of[identity] = identity, fd
        return True

    def drop(self, identity: bytes) -> None:
        fd = self._fd_of.pop(identity, None)
        if fd is not None:
            self._by_fd.pop(fd, None)

    def closed(self, fd: int) -> None:
        identity = self._by_fd.pop(fd, None)
        if identity is not None:
            self._fd_of.pop(identity, None)


class ReplayServer:
    def __init__(
        self,
        endpoint: str,
        writer: JournalWriter | None,
        bus: Stamping,
        curve: CurveConfig | None = None,
        max_peers: int = MAX_PEERS,
        private_dir: bool = False,
    ):
        """`writer`: the journal's (None: the journal could not be opened, and every event is `not_journaled`);
        `bus`: its `last_seq` (the last stamped) and `run`; `private_dir`: an ipc endpoint's directory is vigild's own
        (the default endpoint: made owner-only, or checked and tightened)."""
        self.endpoint = endpoint
        self.writer = writer
        self._bus = bus
        self.curve_config = curve
        self.curve: Any = None
        self.peers = Peers(max_peers)
        self.restarts = 0
        """Times the serving thread failed and was started again."""
        self.refused = 0
        """Requests answered `busy`: `max_peers` other clients were being served."""
        self.errors = 0
        """Requests answered with an error (not understood, or failed on the way)."""
        self._private_dir = private_dir
        self._restart = threading.Lock()
        self._thread = ServiceThread("replay", self._run)
        self._started = False

    def start(self) -> None:
        from vigild.outputs.publisher import is_loopback_endpoint

        if self.curve_config is None and not is_loopback_endpoint(self.endpoint):
            log.warning(
                "INSECURE: the replay socket binds %s, which is reachable from other machines, without CURVE: anyone "
                "who can connect can read the event journal; use the default ipc:// socket or configure `curve:` "
                "(docs/security.md)",
                self.endpoint,
            )
        elif self.curve_config is None and self.endpoint.startswith("tcp://"):
            log.warning(
                "INSECURE: the replay socket binds %s without CURVE: every local user can connect and read the event "
                "journal, snapshots included; use the default ipc:// socket (the daemon's user and group only) or "
                "configure `curve:` (docs/security.md)",
                self.endpoint,
            )
        if self.endpoint.startswith("ipc://"):
            try:
                self._prepare_ipc(Path(self.endpoint[len("ipc://") :]))
            except OSError as exc:
                raise ReplayError(f"cannot bind the replay socket to {self.endpoint}: {exc}") from None
        try:
            self._thread.start()
        except StartError as exc:
            raise ReplayError(f"cannot bind the replay socket to {self.endpoint}: {exc}") from None
        self._started = True

    def _prepare_ipc(self, path: Path) -> None:
        """An owner-only directory (vigild's own: made or tightened; another one: made if missing), and no second
        daemon's socket taken over."""
        paths.socket_path_fits(path)
        if self._private_dir or not path.parent.exists():
            paths.private_dir(path.parent)
        if path.exists():
            probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                return  # a stale socket from a process that died: ZeroMQ replaces it
            finally:
                probe.close()
            raise OSError(f"another process is serving {path} (a second vigild?); give this one journal.replay_endpoint")

    def stop(self) -> None:
        self._thread.stop()

    @property
    def alive(self) -> bool:
        return self._thread.alive

    def ensure_running(self) -> None:
        """Start the thread again if it died (asked at every heartbeat): the socket must not stay silent."""
        with self._restart:  # the heartbeat and `vigild ctl status` may ask at once
            if not self._started or self._thread.stopping.is_set() or self._thread.alive:
                return
            self.restarts += 1
            log.error("the replay thread had ended: serving %s again", self.endpoint)
            try:
                self._thread.start()
            except StartError as exc:  # tried again at the next heartbeat
                log.error("cannot serve %s again: %s", self.endpoint, exc)

    def _run(self, thread: ServiceThread) -> None:
        """The serving thread: binds (its error is the start's), then serves until stopped; a socket that fails
        once it served is bound again after `RESTART_DELAY_S`."""
        while not thread.stopping.is_set():
            try:
                self._serve(thread)
                return
            except Exception:
                if not thread.is_ready:
                    raise
                self.restarts += 1
                log.exception("the replay socket failed: serving %s again", self.endpoint)
            if thread.stopping.wait(RESTART_DELAY_S):
                return

    def _serve(self, thread: ServiceThread) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        socket.setsockopt(zmq.SNDHWM, SEND_HWM)  # a reply is a page: one at a time per client
        socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a client that left, or is not reading: its reply is dropped
        from vigild.curve import bind_secured

        try:
            curve = bind_secured(socket, self.endpoint, self.curve_config, context)
        except (zmq.ZMQError, OSError, ValueError):
            context.term()
            raise  # before `ready`: the start's error; after a failure: tried again
        self.curve = curve
        monitor = None
        database: sqlite3.Connection | None = None
        try:
            if self.endpoint.startswith("ipc://"):
                os.chmod(self.endpoint[len("ipc://") :], SOCKET_MODE)
            monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self.peers = Peers(self.peers.limit)  # a new socket: no client holds a place on it
            thread.ready()
            while not thread.stopping.is_set():
                if not socket.poll(POLL_MS):
                    continue
                identity, fd, frames = self._next_request(socket)
                while monitor.poll(0):  # closes first: a descriptor reused by this request's connection is free
                    self.peers.closed(int(parse_monitor_message(monitor.recv_multipart())["value"]))
                if database is None and self.writer is not None:
                    database = open_read_only(self.writer.journal.path)
                reply = self._reply(database, identity, fd, frames)
                with contextlib.suppress(zmq.Again):  # that client is not reading: it asks again
                    socket.send_multipart([identity, b"", *reply], flags=zmq.NOBLOCK)
        finally:
            if database is not None:
                database.close()
            if monitor is not None:
                socket.disable_monitor()
                monitor.close()
            socket.close()
            if curve is not None:
                curve.stop()
            context.term()

    @staticmethod
    def _next_request(socket: zmq.Socket) -> tuple[bytes, int, list[bytes]]:
        """The routing identity, the connection's descriptor and the request's frames (the first few: the rest are
        read and dropped, so that a message of many frames costs nothing)."""
        identity = socket.recv()
        frames: list[zmq.Frame] = []
        while socket.getsockopt(zmq.RCVMORE):
            frame = socket.recv(copy=False)
            if len(frames) < MAX_FRAMES_KEPT:
                frames.append(frame)
        fd = frames[0].get(zmq.SRCFD) if frames else -1
        return identity, int(fd), [frame.bytes for frame in frames]

    def _reply(self, database: sqlite3.Connection | None, identity: bytes, fd: int, frames: list[bytes]) -> list[bytes]:
        """The reply to one request; never raises."""
        if not self.peers.admit(identity, fd):
            self.refused += 1
            return [_error("busy", f"{self.peers.limit} clients are being served: ask again later")]
        try:
            return self.answer(database, _parse(frames))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            self.errors += 1
            return [_error("bad_request", f"not a replay request: {str(exc)[:200]}")]
        except sqlite3.Error as exc:
            self.errors += 1
            log.warning("replay: cannot read the journal: %s", exc)
            return [_error("internal", f"cannot read the journal: {exc}")]
        except Exception as exc:  # a request must never end the thread
            self.errors += 1
            log.exception("replay: a request failed")
            return [_error("internal", f"{type(exc).__name__}: {str(exc)[:200]}")]

    def status(self) -> dict[str, Any]:
        """For the heartbeat's `journal` section."""
        return {"replay_peers": len(self.peers), "replay_refused": self.refused, "replay_errors": self.errors,
                "replay_restarts": self.restarts}  # fmt: skip

    def answer(self, database: sqlite3.Connection | None, request: dict[str, Any]) -> list[bytes]:
        after = _seq(request["after_seq"])
        until = _seq(request["until_seq"]) if request.get("until_seq") is not None else None
        limit = max(1, min(_seq(request.get("limit", PAGE_EVENTS)), PAGE_EVENTS))
        last_seq = self._bus.last_seq
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
            data, jpeg = body.encode(), self._snapshot(snapshot)
            if kept and size + len(data) + len(jpeg) > PAGE_BYTES:
                break  # the next page starts with it
            parts += [data, jpeg]
            size += len(data) + len(jpeg)
            kept += 1
        full = kept < len(rows) or len(rows) == limit  # more may follow: this page ends at its last event
        rows = rows[:kept]
        through = rows[-1][0] if full else max(upper, after)
        header = {
            "after_seq": after,
            "through": through,
            "events": kept,
            "missing": missing_ranges(after, through, [row[0] for row in rows], oldest),
            "journaled_through": journaled,
            "last_seq": last_seq,
            "run": self._bus.run if self.writer is not None else None,
        }
        return [json.dumps(header).encode(), *parts]

    def _snapshot(self, name: str | None) -> bytes:
        if name is None or self.writer is None:
            return b""
        try:
            return (Path(self.writer.journal.path).parent / SNAPSHOTS / name).read_bytes()
        except OSError:
            return b""  # removed by retention since the row was read


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error": message, "code": code}).encode()


def _parse(frames: list[bytes]) -> dict[str, Any]:
    """The request object of `[b"", json]` (a DEALER or REQ client) or `[json]`; ValueError for anything else."""
    if not frames or len(frames) > 2 or (len(frames) == 2 and frames[0] != b""):
        raise ValueError("expected an empty frame and one holding a JSON object")
    try:
        request = json.loads(frames[-1])
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ValueError(f"expected a JSON object, got {type(request).__name__}")
    return request


def _seq(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQ:
        raise ValueError(f"expected a seq (an integer from 0 to {MAX_SEQ}), got {str(value)[:40]!r}")
    return value
