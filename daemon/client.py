"""What a program needs to talk to vigild: a subscriber for its event stream (`vigild sub`) and a control client
(`vigild ctl`). Light on purpose: neither imports torch, OpenCV nor GStreamer.

Every message is `[topic, json]`, or `[topic, json, jpeg]` for events that carry a snapshot. `seq` rises by one
per event across all topics (heartbeats have a `seq` of their own) and goes on across restarts on one journal, so a
subscriber to every topic (prefix `vigild.`) can count what it missed; with narrower prefixes gaps are expected.
Each event carries the `run` that published it: a restart of the daemon is a new `run`, not a gap.

`Subscriber(resume=True)` misses nothing the daemon journaled: it fills every gap in `seq` from the daemon's replay
socket (vigild.outputs.replay; ZeroMQ's Clone pattern) and yields each event once, in seq order. What cannot be
filled (never journaled, or removed by retention) comes as a gap notice, never silence (docs/events.md#resume).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from vigild import paths
from vigild.curve import ClientKeys

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
GAP_TOPIC = "vigild.sys.gap"
"""The topic of a resuming subscriber's gap notices (they are made by the client, never published)."""
REPLAY_PAGE = 500
REPLAY_BUSY_WAIT_S = 0.2
"""The replay socket is serving as many clients as it may: ask again after this long (until the gap's deadline)."""
REPLAY_RETRY_S = 1.0
"""Once the replay socket has not answered, how long the next gaps wait for it (until it answers again)."""


def _reachable(named: str, publisher: str) -> str:
    """The replay endpoint a heartbeat names, as this client can reach it: a tcp wildcard host (`*`, 0.0.0.0, ::) is
    the publisher endpoint's host."""
    if named.startswith("tcp://") and publisher.startswith("tcp://"):
        host, _, port = named[len("tcp://") :].rpartition(":")
        if host in ("*", "0.0.0.0", "[::]", "::"):
            return f"{publisher.rpartition(':')[0]}:{port}"
    return named


@dataclass(frozen=True)
class Message:
    topic: str
    event: dict[str, Any]
    snapshot: bytes | None = None
    """The JPEG of events with a `snapshot` field (docs/events.md)."""


class Subscriber:
    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        topics: Iterable[str] = ("vigild.",),
        context: zmq.Context | None = None,
        rcvhwm: int = 100_000,
        curve: ClientKeys | None = None,
        resume: bool = False,
        after_seq: int | None = None,
        replay_endpoint: str | None = None,
        replay_timeout: float = 10.0,
    ):
        """`curve`: the server's public key and this client's key pair, for a daemon that requires CURVE.

        `resume`: fill every gap in `seq` from the daemon's replay socket (`replay_endpoint`; by default the one
        the daemon's heartbeat names, and until one is heard `vigild.paths.replay_endpoint()`, the daemon's default
        without a config file: catching up from `after_seq` waits for that first heartbeat) and yield every event exactly once, in seq order, with a gap
        notice (topic `GAP_TOPIC`) for what the journal does not have. `after_seq`: start after this seq (the last
        one a previous run of this program handled; 0: everything the journal holds) and catch up from the journal
        first; None: start with the first live event. `replay_timeout`: how long a gap waits for the journal to
        store it, or for the replay socket to answer, before it is given up as a gap notice."""
        self._context = context or zmq.Context.instance()
        self.socket = self._context.socket(zmq.SUB)
        if curve is not None:
            curve.apply(self.socket)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        self._topics = tuple(topics)
        for topic in self._topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.socket.connect(endpoint)
        self.missed = 0
        """Events skipped according to `seq` within a run (meaningful when subscribed to every topic); with
        `resume`, the events announced by gap notices."""
        self.replayed = 0
        """With `resume`: events that came from the replay socket rather than the live stream."""
        self._last_seq: int | None = None
        self._run: str | None = None
        self._resume = resume
        self._curve = curve
        self._endpoint = endpoint
        self._replay_given = replay_endpoint
        self._replay_heard: str | None = None
        """The replay endpoint the last heartbeat named."""
        self._held: list[Message] = []
        """Live events that came before the first heartbeat, held while catching up waits to hear the replay
        endpoint (until `replay_timeout`)."""
        self._hold_until = time.monotonic() + replay_timeout
        self._replay: zmq.Socket | None = None
        self._replay_down = False
        self._replay_timeout = replay_timeout
        self._next: int | None = after_seq + 1 if after_seq is not None else None
        self._catch_up = resume and after_seq is not None
        self._ready: deque[Message] = deque()

    @property
    def last_seq(self) -> int | None:
        """With `resume`: the seq of the last event handed out (or announced missing); keep it to resume after."""
        return self._next - 1 if self._next is not None else None

    @property
    def replay_endpoint(self) -> str:
        """The replay socket gaps are filled from: the one given, else the one the heartbeat names, else the
        default (vigild.paths.replay_endpoint)."""
        return self._replay_given or self._replay_heard or paths.replay_endpoint(None)

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, or None when `timeout` seconds pass without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ready:
                return self._ready.popleft()
            if self._catch_up and (self._knows_replay() or time.monotonic() >= self._hold_until):
                self._catch_up = False
                assert self._next is not None
                self._fill(self._next, None)
                held, self._held = self._held, []
                for message in held:
                    self._take(message)
                continue
            wait = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            if self._catch_up:  # wake up when the wait for a heartbeat ends
                hold = max(0, int((self._hold_until - time.monotonic()) * 1000))
                wait = hold if wait < 0 else min(wait, hold)
            if not self.socket.poll(wait):
                if self._catch_up and time.monotonic() >= self._hold_until:
                    continue
                return None
            message = self._read()
            if not self._resume:
                return message
            if self._catch_up and not _is_heartbeat(message.event):
                self._held.append(message)  # until the heartbeat names the replay socket to catch up from
                continue
            self._take(message)

    def _knows_replay(self) -> bool:
        return bool(self._replay_given or self._replay_heard)

    def _read(self) -> Message:
        topic, payload, *rest = self.socket.recv_multipart()
        event = json.loads(payload)
        seq = event.get("seq")
        if isinstance(seq, int) and not _is_heartbeat(event) and not self._resume:
            if event.get("run") != self._run:  # the daemon restarted: a new sequence, not a gap
                self._run, self._last_seq = event.get("run"), None
            if self._last_seq is not None and seq > self._last_seq + 1:
                self.missed += seq - self._last_seq - 1
            self._last_seq = seq
        return Message(topic.decode(), event, rest[0] if rest else None)

    # ----- resume: live events in seq order, gaps filled from the replay socket

    def _take(self, message: Message) -> None:
        event = message.event
        seq = event.get("seq")
        if _is_heartbeat(event):  # it says the last seq published: a gap at the end of the stream shows here
            named = (event.get("journal") or {}).get("replay")
            if isinstance(named, str) and named:
                self._replay_heard = _reachable(named, self._endpoint)
            last = (event.get("publisher") or {}).get("last_seq")
            if self._next is not None and isinstance(last, int) and last >= self._next:
                self._fill(self._next, last)
            self._ready.append(message)
            return
        if not isinstance(seq, int):
            self._ready.append(message)
            return
        if self._next is None:
            self._next = seq
        elif event.get("run") != self._run and self._run is not None and seq < self._next:
            self._next = seq  # a restart on another journal (or after a tail that was never journaled): go on
        self._run = event.get("run")
        if seq < self._next:
            return  # replayed already
        if seq > self._next:
            self._fill(self._next, seq - 1)
        if seq >= self._next:
            self._ready.append(message)
            self._next = seq + 1

    def _fill(self, first: int, last: int | None) -> None:
        """Queue the events `first`..`last` from the replay socket (`last` None: up to what the journal holds),
        with gap notices for what it does not have, in seq order."""
        after = first - 1
        deadline = time.monotonic() + self._replay_timeout
        while last is None or after < last:
            reply = self._ask({"after_seq": after, "until_seq": last, "limit": REPLAY_PAGE}, deadline)
            if reply is None:
                if last is not None:  # a known range it cannot fill: said, never silent
                    self._gap(after + 1, last, "no_replay")
                    after = last
                break  # (catching up with a daemon not there yet: the first live event shows what to fill)
            header, events = reply
            items = [(body["seq"], self._message(body, jpeg)) for body, jpeg in events if body["seq"] > after]
            items += [(gap["first"], self._gap_message(gap["first"], gap["last"], gap["reason"]))
                      for gap in header["missing"]]  # fmt: skip
            for _, message in sorted(items, key=lambda item: item[0]):
                if message.topic == GAP_TOPIC or message.topic.startswith(self._topics):
                    self._ready.append(message)
            self.replayed += len(events)
            through = header["through"]
            if through > after:
                after = through
                deadline = time.monotonic() + self._replay_timeout
            if last is None:
                if through >= header["journaled_through"]:
                    break  # caught up with the journal: the live stream goes on from here
            elif after < last and through >= header["journaled_through"]:  # not stored yet: ask again soon
                if time.monotonic() > deadline:
                    self._gap(after + 1, last, "unavailable")
                    after = last
                    break
                time.sleep(0.05)
        if self._next is None or after + 1 > self._next:
            self._next = after + 1
        self._close_replay()  # the replay socket serves few clients at once: a place is held while connected

    def _close_replay(self) -> None:
        if self._replay is not None:
            self._replay.close()
            self._replay = None

    def _ask(self, request: dict[str, Any], deadline: float) -> tuple[dict[str, Any], list[tuple[dict[str, Any], bytes]]] | None:
        """One replay request; None when no answer comes before `deadline` (the socket is then made anew, so that
        a late answer cannot be taken for the next one)."""
        if self._replay is None:
            self._replay = self._context.socket(zmq.DEALER)
            self._replay.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                self._curve.apply(self._replay)
            self._replay.connect(self.replay_endpoint)
        self._replay.send_multipart([b"", json.dumps(request).encode()])
        if self._replay_down:  # it did not answer last time (the daemon stopped?): a short try, not the whole wait
            deadline = min(deadline, time.monotonic() + REPLAY_RETRY_S)
        if not self._replay.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            self._close_replay()
            self._replay_down = True
            return None
        self._replay_down = False
        frames = self._replay.recv_multipart()[1:]
        header = json.loads(frames[0])
        if header.get("code") == "busy" and time.monotonic() + REPLAY_BUSY_WAIT_S < deadline:
            self._close_replay()  # as many clients as it serves: ask again shortly
            time.sleep(REPLAY_BUSY_WAIT_S)
            return self._ask(request, deadline)
        if "error" in header:
            return None
        bodies = frames[1::2]
        jpegs = frames[2::2]
        return header, [(json.loads(body), jpeg) for body, jpeg in zip(bodies, jpegs, strict=True)]

    @staticmethod
    def _message(body: dict[str, Any], jpeg: bytes) -> Message:
        return Message(f"vigild.{body['camera']}.{body['type']}", body, jpeg or None)

    def _gap_message(self, first: int, last: int | None, reason: str) -> Message:
        if last is not None:
            self.missed += last - first + 1
        event = {"type": "gap", "camera": "sys", "first": first, "last": last, "reason": reason}
        return Message(GAP_TOPIC, event)

    def _gap(self, first: int, last: int | None, reason: str) -> None:
        self._ready.append(self._gap_message(first, last, reason))

    def __iter__(self) -> Iterator[Message]:
        while True:
            message = self.receive()
            if message is not None:
                yield message

    def close(self) -> None:
        self.socket.close()
        self._close_replay()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_heartbeat(event: Mapping[str, Any]) -> bool:
    return event.get("type") == "heartbeat" and event.get("camera") == "sys"


def default_runtime_dir(environ: Mapping[str, str] | None = None, config_file: Path | str | None = None) -> Path:
    """The runtime directory (sockets, shared-memory records) of the daemon run with `config_file`: one rule,
    vigild.paths.runtime_dir (docs/service.md#the-state-directory); never a fixed name under /tmp."""
    return paths.runtime_dir(config_file, environ)


def default_endpoint(environ: Mapping[str, str] | None = None, config_file: Path | str | None = None) -> str:
    """The control socket's default: ipc://<default_runtime_dir>/control."""
    return paths.control_endpoint(config_file, environ)


class ControlClient:
    """For `vigild ctl` and programs: one request, one reply (a DEALER, so a lost reply never wedges it)."""

    def __init__(self, endpoint: str | None = None, curve: ClientKeys | None = None, timeout: float = 30.0):
        self.endpoint = endpoint or default_endpoint()
        self._context: zmq.Context = zmq.Context.instance()
        self.socket = self._context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.socket)
        self.socket.connect(self.endpoint)
        self.timeout = timeout

    def request(self, command: str, **arguments: Any) -> tuple[dict[str, Any], bytes | None]:
        """The reply's JSON and its attachment (a snapshot's JPEG). Raises TimeoutError if none comes.

        A DEALER blocks on send while it has no connected peer (a daemon not up yet, or a CURVE handshake the
        daemon refused and keeps refusing), so the send is bounded by the same deadline as the reply."""
        deadline = time.monotonic() + self.timeout
        self.socket.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout * 1000)))
        try:
            self.socket.send_multipart([b"", json.dumps({"cmd": command, **arguments}).encode()])
        except zmq.Again:
            raise TimeoutError(f"could not reach {self.endpoint} within {self.timeout:g} s") from None
        if not self.socket.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            raise TimeoutError(f"no reply from {self.endpoint} within {self.timeout:g} s")
        frames = self.socket.recv_multipart()
        if frames and frames[0] == b"":
            frames = frames[1:]
        return json.loads(frames[0]), frames[1] if len(frames) > 1 else None

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
