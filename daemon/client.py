"""A subscriber for vigild's event stream, for programs and for `vigild sub`.

Every message is `[topic, json]`, or `[topic, json, jpeg]` for events that carry a snapshot. `seq` rises by one
per message across all topics of one daemon run, so a subscriber to every topic (prefix `vigild.`) can count what it missed; with narrower prefixes gaps are expected.
A restart of the daemon starts `seq` again at 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from vigild.curve import ClientKeys

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
        """Messages skipped according to `seq` (meaningful when subscribed to every topic)."""
        self._last_seq: int | None = None

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message, or None when `timeout` seconds pass without one."""
        if timeout is not None and not self.socket.poll(int(timeout * 1000)):
            return None
        topic, payload, *rest = self.socket.recv_multipart()
        event = json.loads(payload)
        seq = event.get("seq")
        if isinstance(seq, int):
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
