"""The NATS output (`outputs: [{type: nats, ...}]`, docs/cluster.md#the-nats-output): every event's wire JSON into a
JetStream stream, on `<prefix>.<camera>.<type>`, with `Nats-Msg-Id` = the event's id, so that JetStream drops an
event published twice within the stream's duplicate window (a retry, a catch-up after a restart).

Nothing is lost across an outage: the output catches up from the journal (vigild.outputs.catchup), and its cursor
moves past a batch only once the stream acknowledged every event of it. Publishing is asynchronous (nats-py's
`publish_async`, on the connection's own thread, vigild.natslink); this output's thread waits for the batch's
acknowledgements, and publishes again what was not acknowledged within `ack_timeout_s`, until it is. Capture, the
chain and the other outputs never wait for the server.

Headers say who ran what: `Vigild-Member` (this daemon's name: the cluster member's, else the daemon id) and
`Vigild-Run` (the run that made the event). The wire JSON is the ZeroMQ wire's, unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.errors import Error as NatsError

from vigild.config.outputs import NatsOutputConfig
from vigild.natslink import NatsLink
from vigild.outputs.catchup import CatchUpOutput, Delivery, JournalLink

log = logging.getLogger("vigild.outputs")

RETRY_S = 2.0
STOP_ACK_WAIT_S = 3.0
DAY_S = 86_400.0


class StreamProblem(Exception):
    """The stream exists but is not one this output may publish into as configured; the message says why."""


class NatsOutput(CatchUpOutput):
    def __init__(self, config: NatsOutputConfig, journal: JournalLink | None, link: Callable[[], NatsLink],
                 member: str):  # fmt: skip
        """`link`: the started connection this output uses (shared with the cluster's placement when both name
        one server and login); released when the output closes."""
        super().__init__(config.name, config.queue_size, journal if config.catch_up else None)
        self.config = config
        self.member = member
        self.published = 0
        self.duplicates = 0
        """Acknowledgements that said `duplicate`: the stream had the event already (dropped there)."""
        self.snapshots = 0
        self.stream_error: str | None = None
        self._make_link = link
        self._link: NatsLink | None = None
        self._unacked: dict[str, tuple[str, bytes, dict[str, str]]] = {}
        """Message id → (subject, body, headers), in the order sent, until the stream acknowledged it."""
        self._stream_ok_on = -1
        """The connection (`connects`) on which the stream was checked."""
        self._gave_up = False
        self._next_check = 0.0
        self._unexpected: str | None = None

    # ----- the output's thread

    def open(self) -> None:
        super().open()
        self._link = self._make_link()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._link is not None:
                self._link.release()

    def send(self, deliveries: list[Delivery]) -> None:
        prefix = self.config.subject_prefix
        for delivery in deliveries:
            subject = prefix + delivery.topic[len("vigild") :]
            headers = {"Nats-Msg-Id": delivery.event_id, "Vigild-Member": self.member, "Vigild-Run": delivery.run}
            self._unacked[delivery.event_id] = (subject, delivery.body, headers)
            if delivery.snapshot is not None and self.config.snapshots:
                self._snapshot(delivery, subject.split(".")[1])

    def gap(self, first: int, last: int, reason: str) -> None:
        body = json.dumps({"gap": {"first": first, "last": last, "reason": reason}, "member": self.member},
                          separators=(",", ":")).encode()  # fmt: skip
        message_id = f"gap-{self.member}-{first}-{last}"
        self._unacked[message_id] = (f"{self.config.subject_prefix}.$gap", body, {"Nats-Msg-Id": message_id})

    def flush(self) -> bool:
        """Publish what is not acknowledged until the stream acknowledged all of it (False: stopping first)."""
        stop_by: float | None = None
        while self._unacked:
            link = self._link
            assert link is not None
            if self._thread.stopping.is_set():
                if self._gave_up:  # the next pages of a catch-up: the stop goes on
                    return False
                stop_by = stop_by or time.monotonic() + STOP_ACK_WAIT_S
                if not link.connected.is_set() or time.monotonic() > stop_by:
                    log.warning("output %s: stopping with %d events not acknowledged by the stream; they are sent "
                                "again from the journal at the next start", self.id, len(self._unacked))  # fmt: skip
                    self._gave_up = True
                    return False
            self.alive_at = time.monotonic()
            if not link.connected.is_set():
                link.connected.wait(RETRY_S / 4)
                continue
            if not self._check_stream(link):
                time.sleep(RETRY_S / 4)
                continue
            try:
                acked = link.call(self._publish(link, list(self._unacked.items())), self.config.ack_timeout_s + 2)
            except Exception as exc:  # a timeout, a connection lost under way: publish again (deduplicated)
                problem = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, TimeoutError | NatsError) and problem != self._unexpected:
                    log.error("output %s: publishing failed: %s; retrying", self.id, problem)
                    self._unexpected = problem
                log.debug("output %s: publish: %s", self.id, problem)
                self._stream_ok_on = -1  # "no stream" after a server lost its store: checked again
                time.sleep(RETRY_S / 4)
                continue
            for message_id in acked:
                del self._unacked[message_id]
        return True

    def tick(self) -> None:
        """Check the stream as soon as connected (and after each reconnection), events or not."""
        link = self._link
        if link is not None and link.connected.is_set():
            self._check_stream(link)
        super().tick()

    def _check_stream(self, link: NatsLink) -> bool:
        """The stream is there as configured (checked once per connection, made if missing); False: not now (the
        problem is in `stream_error` and the log), tried again after `RETRY_S`."""
        if self._stream_ok_on == link.connects:
            return True
        if time.monotonic() < self._next_check:
            return False
        try:
            link.call(self._ensure_stream(link), self.config.ack_timeout_s + 2)
        except StreamProblem as exc:
            if str(exc) != self.stream_error:
                log.error("output %s: %s; retrying every %.0f s, the events wait in the journal", self.id, exc,
                          RETRY_S)  # fmt: skip
            self.stream_error = str(exc)
            self._next_check = time.monotonic() + RETRY_S
            return False
        except Exception as exc:  # the connection went under way: the next try
            log.debug("output %s: stream check: %s: %s", self.id, type(exc).__name__, exc)
            self._next_check = time.monotonic() + RETRY_S / 4
            return False
        self._stream_ok_on = link.connects
        self.stream_error = None
        return True

    def _snapshot(self, delivery: Delivery, camera: str) -> None:
        link = self._link
        jpeg = delivery.snapshot
        assert link is not None and jpeg is not None
        nc = link.nc
        if nc is None or not link.connected.is_set():
            self.drop("snapshot_disconnected")
            return
        if len(jpeg) > nc.max_payload:
            self.drop("snapshot_too_large")
            return
        subject = f"{self.config.subject_prefix}_snapshots.{camera}"
        link.submit(nc.publish(subject, jpeg, headers={"Vigild-Event-Id": delivery.event_id}))
        self.snapshots += 1

    # ----- on the connection's loop

    async def _ensure_stream(self, link: NatsLink) -> None:
        """The stream exists with the configured limits (created if missing); StreamProblem if it differs."""
        from nats.js.api import StorageType
        from nats.js.errors import APIError, NotFoundError

        config = self.config
        js = link.nc.jetstream()
        wanted = {
            "subjects": f"{config.subject_prefix}.>",
            "max_age": config.max_age_days * DAY_S,
            "max_bytes": config.max_bytes,
            "duplicate_window": config.duplicate_window_s,
            "num_replicas": config.replicas,
            "storage": config.storage,
        }
        try:
            info = await js.stream_info(config.stream)
        except NotFoundError:
            try:
                await js.add_stream(name=config.stream, subjects=[wanted["subjects"]], max_age=wanted["max_age"],
                                    max_bytes=config.max_bytes, duplicate_window=config.duplicate_window_s,
                                    num_replicas=config.replicas, storage=StorageType(config.storage))  # fmt: skip
            except APIError as exc:  # another stream takes these subjects, replicas the server cannot give...
                raise StreamProblem(f"cannot create the stream {config.stream} ({wanted['subjects']}): "
                                    f"{exc.description or exc}") from None  # fmt: skip
            log.info("output %s: created the stream %s (%s)", self.id, config.stream, wanted["subjects"])
            return
        have = info.config
        actual = {
            "subjects": " ".join(have.subjects or []),
            "max_age": float(have.max_age or 0.0),
            "max_bytes": have.max_bytes if have.max_bytes is not None else -1,
            "duplicate_window": float(have.duplicate_window or 0.0),
            "num_replicas": have.num_replicas or 1,
            "storage": str(getattr(have.storage, "value", have.storage) or "file"),
        }
        if wanted["subjects"] not in (have.subjects or []) and ">" not in (have.subjects or []):
            raise StreamProblem(f"the stream {config.stream} takes {actual['subjects']!r}, not "
                                f"{wanted['subjects']!r}: give `subject_prefix` or `stream` another value")  # fmt: skip
        differ = [f"{key} {actual[key]!r} (the config says {wanted[key]!r})" for key in wanted
                  if key != "subjects" and actual[key] != wanted[key]]  # fmt: skip
        if differ:
            raise StreamProblem(f"the stream {config.stream} exists with other limits: {', '.join(differ)}; change "
                                "the output's settings to match, or the stream (`nats stream edit`)")  # fmt: skip

    async def _publish(self, link: NatsLink, messages: list[tuple[str, tuple[str, bytes, dict[str, str]]]]) -> list[str]:
        """Publish `messages`, await their acknowledgements up to `ack_timeout_s`: the ids acknowledged."""
        from nats.js.errors import NoStreamResponseError

        js = link.nc.jetstream()
        futures = []
        for _, (subject, body, headers) in messages:
            futures.append(await js.publish_async(subject, body, headers=dict(headers), stream=self.config.stream))
        await asyncio.wait(futures, timeout=self.config.ack_timeout_s)
        acked = []
        for (message_id, _), future in zip(messages, futures, strict=True):
            if not future.done():
                future.cancel()
                continue
            if future.cancelled() or future.exception() is not None:
                if isinstance(future.exception(), NoStreamResponseError):
                    self._stream_ok_on = -1
                continue
            ack = future.result()
            acked.append(message_id)
            if ack.duplicate:
                self.duplicates += 1
            else:
                self.published += 1
        return acked

    def status(self) -> dict[str, Any]:
        status = super().status()
        link = self._link
        connected = link is not None and link.connected.is_set()
        status.update(
            url=link.login.url if link is not None else self.config.url,
            stream=self.config.stream,
            member=self.member,
            connected=connected,
            connection_error=link.error if link is not None else None,
            stream_error=self.stream_error,
            unacked=len(self._unacked),
            published=self.published,
            duplicates=self.duplicates,
            snapshots=self.snapshots,
        )
        if status["state"] == "running" and not connected:
            status["state"] = "disconnected"
        return status
