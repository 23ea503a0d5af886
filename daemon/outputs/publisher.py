"""The ZeroMQ PUB output: events go out as `[topic, json]` multipart messages (a third part: the snapshot's JPEG)
from the publisher's own thread.

The bus (vigild.outputs.bus) stamps each event and offers it here without blocking: the publisher's queue is
bounded (`queue_size`); when it is full the event is dropped and counted (`dropped_queue_full`), and because `seq`
was already taken a subscriber sees the gap. Heartbeats have a `seq` of their own, so the events' `seq` counts
events only. The socket sends without blocking; at the high-water mark ZeroMQ drops for that subscriber, also
counted (`dropped_unsendable`, with events whose JSON cannot be built).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import zmq

from vigild.config.settings import CurveConfig, PublisherConfig
from vigild.outputs.base import OutputError, QueuedOutput
from vigild.outputs.bus import Stamped

log = logging.getLogger("vigild.publisher")

SUBSCRIPTIONS_PER_ROUND = 100


@dataclass
class PublisherStats:
    queued: int = 0
    sent: int = 0
    sent_by_type: Counter[str] = field(default_factory=Counter)
    dropped_queue_full: int = 0
    dropped_unsendable: int = 0
    """Refused by ZeroMQ or not encodable as JSON. A PUB socket drops silently for one subscriber at its
    high-water mark; that subscriber sees those drops as gaps in `seq`."""


class PublisherError(OutputError):
    pass


def is_loopback_endpoint(endpoint: str) -> bool:
    if not endpoint.startswith("tcp://"):
        return True  # ipc:// and inproc:// never leave the machine
    host = urlsplit(endpoint).hostname or ""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Publisher(QueuedOutput):
    heartbeats = True

    def __init__(self, config: PublisherConfig, curve: CurveConfig | None = None):
        super().__init__("publisher", config.queue_size)
        self.config = config
        self.curve_config = curve
        self.curve: Any = None  # the CurveServer, made on the publisher thread
        self.tick_s = config.heartbeat_interval  # the longest it waits: `alive_at` stays fresh for the watchdog
        self.sent_by_type: Counter[str] = Counter()
        self._context = zmq.Context()  # our own, terminated on stop: that is what makes `linger_ms` flush
        self._socket: zmq.Socket | None = None
        self.subscriptions = 0
        """Subscriptions received (only counted with `await_subscribers`, which makes the socket an XPUB)."""
        self._subscribed = threading.Event()
        self._awaiting = config.await_subscribers > 0

    @property
    def stats(self) -> PublisherStats:
        return PublisherStats(
            queued=self.delivered + self.drops["unsendable"] + self.queued,
            sent=self.delivered,
            sent_by_type=self.sent_by_type,
            dropped_queue_full=self.drops["queue_full"],
            dropped_unsendable=self.drops["unsendable"],
        )

    def start(self) -> None:
        """Bind in the publisher thread (sockets stay on one thread) and wait for the outcome."""
        if not is_loopback_endpoint(self.config.endpoint) and self.curve_config is None:
            log.warning(
                "INSECURE: publisher binds %s, which is reachable from other machines, without CURVE: anyone who "
                "can connect receives every event; bind to 127.0.0.1 or configure `curve:` (docs/security.md)",
                self.config.endpoint,
            )
        try:
            super().start()
        except OutputError as exc:
            raise PublisherError(f"cannot bind publisher to {self.config.endpoint}: {exc}") from None

    def await_subscribers(self, stop: threading.Event | None = None) -> bool:
        """Block until `await_subscribers` subscriptions have arrived, `await_timeout` has passed or `stop` is set;
        True if they arrived.

        PUB/SUB drops what is published before a subscription reaches the publisher ("slow joiner"); a daemon that
        holds capture until then loses no event to subscribers that were started before it."""
        wanted = self.config.await_subscribers
        if wanted == 0:
            return True
        log.info("waiting up to %.0f s for %d subscriber(s) before capture starts", self.config.await_timeout, wanted)
        deadline = time.monotonic() + self.config.await_timeout
        arrived = False
        while not arrived and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            arrived = self._subscribed.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        self._awaiting = False
        self.tick_s = self.config.heartbeat_interval
        if arrived:
            return True
        log.warning(
            "%d of %d awaited subscription(s) arrived within %.0f s; capture starts anyway",
            self.subscriptions,
            wanted,
            self.config.await_timeout,
        )
        return False

    # ----- on the publisher thread

    def open(self) -> None:
        # an XPUB is a PUB that also hands over its subscribers' subscriptions, which `await_subscribers` counts
        counting = self.config.await_subscribers > 0
        socket = self._context.socket(zmq.XPUB if counting else zmq.PUB)
        if counting:
            socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, also a second one to the same topic
            self.tick_s = 0.02  # look for the awaited subscriptions often
        socket.setsockopt(zmq.SNDHWM, self.config.hwm)
        socket.setsockopt(zmq.LINGER, self.config.linger_ms)
        from vigild.curve import bind_secured

        try:
            self.curve = bind_secured(socket, self.config.endpoint, self.curve_config, self._context)
        except (zmq.ZMQError, OSError, ValueError):
            socket.close(0)
            self._context.term()
            raise
        self._socket = socket

    def tick(self) -> None:
        if self.config.await_subscribers > 0 and self._socket is not None:
            self._read_subscriptions(self._socket)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()  # with LINGER = linger_ms
        if self.curve is not None:
            self.curve.stop()
        self._context.term()  # blocks until queued messages are sent or the linger runs out

    def _read_subscriptions(self, socket: zmq.Socket) -> None:
        """Take what the XPUB has received (read, so that it does not pile up): a subscription starts with 1. At
        most `SUBSCRIPTIONS_PER_ROUND` a round, so that peers flooding subscriptions cannot hold up the events."""
        for _ in range(SUBSCRIPTIONS_PER_ROUND):
            if not socket.poll(0, zmq.POLLIN):
                return
            message = socket.recv(zmq.NOBLOCK)
            if message[:1] == b"\x01":
                self.subscriptions += 1
                if self.subscriptions >= self.config.await_subscribers:
                    self._subscribed.set()

    def deliver(self, batch: list[Stamped]) -> None:
        socket = self._socket
        assert socket is not None
        for item in batch:
            event = item.event
            try:
                parts = [item.topic, item.wire()]
                if event.snapshot is not None:
                    parts.append(event.snapshot.jpeg)
                socket.send_multipart(parts, flags=zmq.NOBLOCK)
            except (zmq.Again, ValueError, TypeError) as exc:
                self.drop("unsendable")
                log.warning("dropped %s event seq=%d: %s", event.topic, item.seq, exc)
                continue
            self.delivered += 1
            self.sent_by_type[event.type] += 1
