"""The ZeroMQ PUB side: events go out as `[topic, json]` multipart messages from one dedicated thread.

`publish()` never blocks its caller: it stamps the event with its identity, the next `seq`, a fresh `id` and the
daemon's `run`, and puts it on a bounded queue; when the queue is full the event is dropped and counted, and because
`seq` was already taken a subscriber sees the gap. Heartbeats have a `seq` of their own, so the events' `seq` counts
events only. With a journal attached, every event is handed to its writer as it is stamped, in seq order, before the
live queue can drop it, and `seq` goes on from the journal's last.
The socket sends without blocking; at the high-water mark ZeroMQ drops for that subscriber, also counted.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import zmq

from vigild.config.settings import CurveConfig, PublisherConfig
from vigild.events import Event

if TYPE_CHECKING:
    from vigild.outputs.journal import JournalWriter

log = logging.getLogger("vigild.publisher")

_STOP = object()
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


class PublisherError(Exception):
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


class Publisher:
    def __init__(self, config: PublisherConfig, curve: CurveConfig | None = None):
        self.config = config
        self.curve_config = curve
        self.curve: Any = None  # the CurveServer, made on the publisher thread
        self.alive_at = time.monotonic()
        """When the publisher thread last went round its loop (at least once per heartbeat interval)."""
        self.stats = PublisherStats()
        self._context = zmq.Context()  # our own, terminated on stop: that is what makes `linger_ms` flush
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self.run = uuid.uuid4().hex
        """This run's id: in every event it publishes, so a subscriber can tell a restart from a gap."""
        self._seq = 0
        self._heartbeats = 0
        self.journal: JournalWriter | None = None
        self._seq_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._bound = threading.Event()
        self._bind_error: str | None = None
        self.subscriptions = 0
        """Subscriptions received (only counted with `await_subscribers`, which makes the socket an XPUB)."""
        self._subscribed = threading.Event()
        self._awaiting = config.await_subscribers > 0

    def start(self) -> None:
        """Bind in the publisher thread (sockets stay on one thread) and wait for the outcome."""
        if not is_loopback_endpoint(self.config.endpoint) and self.curve_config is None:
            log.warning(
                "INSECURE: publisher binds %s, which is reachable from other machines, without CURVE: anyone who "
                "can connect receives every event; bind to 127.0.0.1 or configure `curve:` (docs/security.md)",
                self.config.endpoint,
            )
        self._thread.start()
        self._bound.wait()
        if self._bind_error is not None:
            self._thread.join()
            raise PublisherError(f"cannot bind publisher to {self.config.endpoint}: {self._bind_error}")

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
        if arrived:
            return True
        log.warning(
            "%d of %d awaited subscription(s) arrived within %.0f s; capture starts anyway",
            self.subscriptions,
            wanted,
            self.config.await_timeout,
        )
        return False

    def attach_journal(self, journal: JournalWriter) -> None:
        """Journal every event from now on (before any is published): `seq` goes on from the journal's last."""
        with self._seq_lock:
            self.journal = journal
            self._seq = max(self._seq, journal.through)
            journal.run = self.run

    @property
    def last_seq(self) -> int:
        """The seq of the last event stamped (0 before the first of a journal-less run)."""
        return self._seq

    def publish(self, event: Event) -> None:
        event_id = uuid.uuid4().hex
        with self._seq_lock:
            if event.is_heartbeat:
                self._heartbeats += 1
                seq = self._heartbeats
            else:
                self._seq += 1
                seq = self._seq
                if self.journal is not None:  # in seq order, whatever happens to the live queue
                    self.journal.put_event(seq, event_id, event)
        try:
            self._queue.put_nowait((seq, event_id, event))
            self.stats.queued += 1
        except queue.Full:
            self.stats.dropped_queue_full += 1

    def stop(self) -> None:
        """Send what is queued, then close the socket with the configured linger."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        # an XPUB is a PUB that also hands over its subscribers' subscriptions, which `await_subscribers` counts
        counting = self.config.await_subscribers > 0
        socket = self._context.socket(zmq.XPUB if counting else zmq.PUB)
        if counting:
            socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, also a second one to the same topic
        socket.setsockopt(zmq.SNDHWM, self.config.hwm)
        socket.setsockopt(zmq.LINGER, self.config.linger_ms)
        from vigild.curve import bind_secured

        try:
            self.curve = bind_secured(socket, self.config.endpoint, self.curve_config, self._context)
        except (zmq.ZMQError, OSError, ValueError) as exc:
            self._bind_error = str(exc)
            self._context.term()
            self._bound.set()
            return
        self._bound.set()
        interval = self.config.heartbeat_interval  # the longest it waits: `alive_at` stays fresh for the watchdog
        try:
            while True:
                self.alive_at = time.monotonic()
                wait = interval
                if self._awaiting and not self._subscribed.is_set():
                    wait = min(wait, 0.02)  # look for the awaited subscriptions often
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    break
                if counting:
                    self._read_subscriptions(socket)
                if item is not None:
                    self._send(socket, *item)
        finally:
            socket.close()  # with LINGER = linger_ms
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

    def _send(self, socket: zmq.Socket, seq: int, event_id: str, event: Event) -> None:
        try:
            body = event.to_json_dict(seq, event_id, self.run)
            payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
            parts = [event.topic.encode(), payload]
            if event.snapshot is not None:
                parts.append(event.snapshot.jpeg)
            socket.send_multipart(parts, flags=zmq.NOBLOCK)
        except (zmq.Again, ValueError, TypeError) as exc:
            self.stats.dropped_unsendable += 1
            log.warning("dropped %s event seq=%d: %s", event.topic, seq, exc)
            return
        self.stats.sent += 1
        self.stats.sent_by_type[event.type] += 1
