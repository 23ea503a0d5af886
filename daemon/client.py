"""What a program needs to talk to vigild: a subscriber for its event stream (`vigild sub`) and a control client
(`vigild ctl`). Light on purpose: neither imports torch, OpenCV nor GStreamer.

Every message is `[topic, json]`, or `[topic, json, jpeg]` for events that carry a snapshot. `seq` rises by one
per event across all topics of one daemon run (heartbeats have a `seq` of their own), so a subscriber to every topic
(prefix `vigild.`) can count what it missed; with narrower prefixes gaps are expected. Each event carries the `run`
that published it: a restart of the daemon is a new `run` (and starts `seq` again), not a gap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from vigild.service.curve import ClientKeys

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


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
    ):
        """`curve`: the server's public key and this client's key pair, for a daemon that requires CURVE."""
        self._context = context or zmq.Context.instance()
        self.socket = self._context.socket(zmq.SUB)
        if curve is not None:
            curve.apply(self.socket)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.socket.connect(endpoint)
        self.missed = 0
        """Events skipped according to `seq` within a run (meaningful when subscribed to every topic)."""
        self._last_seq: int | None = None
        self._run: str | None = None

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, or None when `timeout` seconds pass without one."""
        if timeout is not None and not self.socket.poll(int(timeout * 1000)):
            return None
        topic, payload, *rest = self.socket.recv_multipart()
        event = json.loads(payload)
        seq = event.get("seq")
        heartbeat = event.get("type") == "heartbeat" and event.get("camera") == "sys"
        if isinstance(seq, int) and not heartbeat:
            if event.get("run") != self._run:  # the daemon restarted: a new sequence, not a gap
                self._run, self._last_seq = event.get("run"), None
            if self._last_seq is not None and seq > self._last_seq + 1:
                self.missed += seq - self._last_seq - 1
            self._last_seq = seq
        return Message(topic.decode(), event, rest[0] if rest else None)

    def __iter__(self) -> Iterator[Message]:
        while True:
            message = self.receive()
            if message is not None:
                yield message

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_runtime_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$RUNTIME_DIRECTORY under systemd, else $XDG_RUNTIME_DIR/vigild, else ~/.local/state/vigild: never a fixed
    name under /tmp, which another user could create first."""
    env = os.environ if environ is None else environ
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime)
    base = env.get("XDG_RUNTIME_DIR")
    home = env.get("HOME") or str(Path.home())
    return Path(base) / "vigild" if base else Path(home) / ".local" / "state" / "vigild"


def default_endpoint(environ: Mapping[str, str] | None = None) -> str:
    """ipc://<default_runtime_dir>/control."""
    return f"ipc://{default_runtime_dir(environ)}/control"


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
        """The reply's JSON and its attachment (a snapshot's JPEG). Raises TimeoutError if none comes."""
        self.socket.send_multipart([b"", json.dumps({"cmd": command, **arguments}).encode()])
        if not self.socket.poll(int(self.timeout * 1000)):
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
