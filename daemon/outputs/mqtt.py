"""The MQTT output (`outputs: [{type: mqtt, url: ...}]`, docs/mqtt.md): every event's wire JSON on
`<prefix>/<camera>/<type>`, the daemon's availability as its Last Will, retained state and Home Assistant discovery
(vigild.outputs.mqtt_state), and optional commands; through paho-mqtt 2.

Nothing is lost across an outage: the output catches up from the journal (vigild.outputs.catchup), and its cursor
moves past a batch only once the broker acknowledged every event of it (QoS 1: at least once; a consumer drops
duplicates by `id`). While the broker is away the output's thread waits for the acks and paho reconnects (every
1 to 10 s); what the bus offers meanwhile waits in the journal, so capture, the chain and the ZeroMQ publisher never
wait for the broker. paho's own network thread does the I/O; what paho cannot say (why a connection failed: refused,
unreachable, a certificate not trusted) a probe of the broker finds out (`connection_problem`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from vigild.config.outputs import MqttOutputConfig
from vigild.config.sources import redact
from vigild.outputs.catchup import CatchUpOutput, Delivery, JournalLink
from vigild.outputs.mqtt_state import Discovery, StateTopics, Topics

log = logging.getLogger("vigild.outputs")

RECONNECT_MIN_S, RECONNECT_MAX_S = 1, 10
PROBE_TIMEOUT_S = 5.0
ACK_POLL_S = 0.02
STOP_ACK_WAIT_S = 3.0
"""How long a stopping output waits for a connected broker's last acknowledgements."""
ONLINE, OFFLINE = b"online", b"offline"


class CameraSwitch(Protocol):
    """What the commands need of the daemon (vigild.service.daemon.Daemon)."""

    def pause(self, name: str) -> dict[str, str]: ...

    def resume(self, name: str) -> dict[str, str]: ...


@dataclass(frozen=True)
class MqttContext:
    daemon_id: str
    """This daemon's name on the broker (the availability topic, the default client id, unique ids)."""
    version: str
    cameras: CameraSwitch | None = None


def tls_context(config: MqttOutputConfig) -> ssl.SSLContext:
    """The TLS context of an `mqtts://` url: the broker's certificate verified against `tls.ca` (default: the
    system's CAs) and its host name checked; OSError/ssl.SSLError naming a file that cannot be read."""
    context = ssl.create_default_context(cafile=str(config.tls.ca) if config.tls.ca else None)
    if config.tls.cert is not None and config.tls.key is not None:
        context.load_cert_chain(str(config.tls.cert), str(config.tls.key))
    return context


def check_mqtt(config: MqttOutputConfig) -> None:
    """What can be checked before the output starts (certificate files): OSError/ValueError saying what is wrong."""
    if config.secure:
        try:
            tls_context(config)
        except ssl.SSLError as exc:
            raise ValueError(f"the TLS files cannot be used: {exc.reason or exc}") from None


def connection_problem(config: MqttOutputConfig) -> str:
    """Why a connection to the broker fails, as far as a TCP (and TLS) handshake tells."""
    try:
        with socket.create_connection((config.host, config.port), timeout=PROBE_TIMEOUT_S) as raw:
            if config.secure:
                with tls_context(config).wrap_socket(raw, server_hostname=config.host):
                    pass
    except ssl.SSLCertVerificationError as exc:
        return f"the broker's certificate is not trusted: {exc.verify_message or exc.reason}"
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except OSError as exc:
        return f"cannot connect to {config.host}:{config.port}: {exc.strerror or exc}"
    return "the connection was closed during the MQTT handshake"


class MqttOutput(CatchUpOutput):
    heartbeats = True

    def __init__(self, config: MqttOutputConfig, journal: JournalLink | None, context: MqttContext):
        super().__init__(config.name, config.queue_size, journal if config.catch_up else None)
        self.config = config
        self.context = context
        self.topics = Topics(config.topic_prefix, context.daemon_id)
        self.client_id = config.client_id or f"vigild-{context.daemon_id}-{config.name}"
        self.connection_error: str | None = None
        self.connects = 0
        self.published_state = 0
        self._connected = threading.Event()
        self._client: mqtt.Client | None = None
        self._unacked: deque[int] = deque()
        """The mids of what this thread sent with QoS > 0, in order, until the broker acknowledged them."""
        self._acked: set[int] = set()
        """Mids paho reported as acknowledged (or, for QoS 0, sent), on its thread."""
        self._commands: deque[tuple[str, bool]] = deque(maxlen=64)
        self._stop_by: float | None = None
        self._stop_warned = False
        self._secrets = (config.password.get_secret_value(),) if config.password else ()
        self.state_topics = StateTopics(self.topics, config.snapshots) if config.state else None
        self.discovery = (
            Discovery(self.topics, config.discovery_prefix, context.version, config.commands)
            if config.homeassistant
            else None
        )

    # ----- the output's thread

    def open(self) -> None:
        config = self.config
        protocol = mqtt.MQTTv5 if config.protocol == "5" else mqtt.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=protocol,
                             clean_session=True if protocol == mqtt.MQTTv311 else None)  # fmt: skip
        if config.username is not None:
            client.username_pw_set(config.username, config.password.get_secret_value() if config.password else None)
        if config.secure:
            client.tls_set_context(tls_context(config))
        client.will_set(self.topics.available, OFFLINE, qos=1, retain=True)
        client.max_inflight_messages_set(config.inflight)
        client.max_queued_messages_set(0)  # what waits is one batch at most: the thread waits for its acks
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client
        client.connect_async(config.host, config.port, keepalive=config.keepalive)
        client.loop_start()
        super().open()

    def close(self) -> None:
        super().close()
        client = self._client
        if client is None:
            return
        if self._connected.is_set():  # a clean disconnect: the broker keeps the Will to itself, so say it here
            with contextlib.suppress(
                RuntimeError, ValueError
            ):  # the connection went meanwhile: the broker sends the Will
                client.publish(self.topics.available, OFFLINE, qos=1, retain=True).wait_for_publish(2.0)
        client.disconnect()
        client.loop_stop()

    def send(self, deliveries: list[Delivery]) -> None:
        client = self._client
        assert client is not None
        qos, state = self.config.qos_events, self.state_topics
        for delivery in deliveries:
            _, camera, kind = delivery.topic.split(".", 2)
            self._publish(self.topics.event(camera, kind), delivery.body, qos)
            if state is not None:
                snapshot = delivery.snapshot
                self._publish_state(state.update(camera, kind, delivery.body, snapshot))

    def gap(self, first: int, last: int, reason: str) -> None:
        body = json.dumps({"gap": {"first": first, "last": last, "reason": reason}}, separators=(",", ":"))
        self._publish(self.topics.gap, body.encode(), self.config.qos_events)

    def flush(self) -> bool:
        """Wait until the broker acknowledged everything sent (it may be away: paho sends it again once it is
        back); False when the output stops first: the cursor stays where the broker confirmed."""
        while self._unacked:
            if self._unacked[0] in self._acked:
                self._acked.discard(self._unacked.popleft())
                continue
            if self._thread.stopping.is_set():  # a connected broker gets a moment to acknowledge the last batch
                if self._stop_by is None:
                    self._stop_by = time.monotonic() + STOP_ACK_WAIT_S
                if not self._connected.is_set() or time.monotonic() > self._stop_by:
                    if not self._stop_warned:
                        self._stop_warned = True
                        log.warning("output %s: stopping with %d events not acknowledged by the broker; they are "
                                    "sent again from the journal at the next start", self.id, len(self._unacked))  # fmt: skip
                    return False
            self.alive_at = time.monotonic()
            time.sleep(ACK_POLL_S)
        self._acked.clear()  # what is left are QoS 0 messages (heartbeats), whose mids paho reuses
        return True

    def tick(self) -> None:
        beat, self.heartbeat = self.heartbeat, None  # the latest only (QoS 0 by default: at most once)
        if beat is not None and self._connected.is_set():
            try:
                body = beat.wire()
            except ValueError:
                body = None
            if body is not None:
                self._client.publish(self.topics.heartbeat, body, qos=self.config.qos_heartbeats)  # type: ignore[union-attr]
                if self.state_topics is not None:
                    self._publish_state(self.state_topics.heartbeat(json.loads(body)))
        while self._commands:
            self._command(*self._commands.popleft())
        super().tick()

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)  # type: ignore[union-attr]
        if qos > 0:
            self._unacked.append(info.mid)  # paho sends it again after a reconnect until it is acknowledged

    def _publish_state(self, messages: list[tuple[str, bytes]]) -> None:
        """Retained state and discovery configs: QoS 1, acknowledged like the events."""
        for topic, payload in messages:
            self._publish(topic, payload, 1, retain=True)
        self.published_state += len(messages)
        if self.discovery is not None and messages:
            assert self.state_topics is not None
            for topic, payload in self.discovery.update(self.state_topics):
                self._publish(topic, payload, 1, retain=True)

    def _command(self, camera: str, enabled: bool) -> None:
        switch = self.context.cameras
        if switch is None:
            return
        try:
            result = switch.resume(camera) if enabled else switch.pause(camera)
        except Exception as exc:  # an unknown camera, a change under way: logged, nothing else happens
            log.warning("output %s: command %s camera %s refused: %s", self.id, "resume" if enabled else "pause",
                        camera, exc)  # fmt: skip
            return
        log.info("output %s: camera %s %s by an MQTT command (%s)", self.id, camera,
                 "resumed" if enabled else "paused", result)  # fmt: skip

    # ----- paho's network thread

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._problem(f"the broker refused the connection: {reason}")
            return
        self.connects += 1
        if self.connection_error is not None:
            log.info("output %s: connected to %s again", self.id, self.config.url)
        self.connection_error = None
        client.publish(self.topics.available, ONLINE, qos=1, retain=True)
        retained = self.state_topics.retained() if self.state_topics is not None else []
        if self.discovery is not None:
            retained += self.discovery.retained()
        for topic, payload in retained:  # a broker without persistence lost them
            client.publish(topic, payload, qos=1, retain=True)
        if self.config.commands:
            client.subscribe(self.topics.command("+"), qos=1)
        self._connected.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._problem(connection_problem(self.config))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and not self._thread.stopping.is_set():
            self._problem(f"lost the connection to the broker: {reason}")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):  # MQTT 5: the broker took it and refused it (not authorized...)
            self.drop("broker_refused")
        self._acked.add(mid)  # once a message: paho reports the first acknowledgement only

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        camera = self.topics.command_camera(message.topic)
        payload = message.payload.strip().upper()
        if camera is None or payload not in (b"ON", b"OFF"):
            log.warning("output %s: ignored a command on %s (expected ON or OFF)", self.id, message.topic[:200])
            return
        self._commands.append((camera, payload == b"ON"))

    def _problem(self, problem: str) -> None:
        problem = redact(problem, self._secrets)
        if problem != self.connection_error:
            log.error("output %s: %s (%s); retrying, the events wait in the journal", self.id, problem,
                      self.config.url)  # fmt: skip
        self.connection_error = problem

    def status(self) -> dict[str, Any]:
        status = super().status()
        status.update(
            url=self.config.url,
            client_id=self.client_id,
            connected=self._connected.is_set(),
            connection_error=self.connection_error,
            connects=self.connects,
            unacked=len(self._unacked),
            state_messages=self.published_state,
            state_skipped=self.state_topics.malformed if self.state_topics is not None else 0,
        )
        if status["state"] == "running" and not self._connected.is_set():
            status["state"] = "disconnected"
        return status
