"""The `outputs:` list: where events go besides the ZeroMQ publisher and the journal (docs/outputs.md).

Each entry has a `type` and an `id` (default: its type; unique in the list), and is reloadable on its own: a reload
starts the entries that arrive, stops those that leave, and restarts those whose settings changed, leaving the
others running. A new output type is one model here (added to `OutputConfig`) and one module in vigild.outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from vigild.config.cluster import BUCKET, NatsServer, nats_url
from vigild.plugin import MAX_NAME_LENGTH

OutputId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=MAX_NAME_LENGTH)]


class OutputEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: OutputId | None = Field(None, description="The output's name in the status and in the journal's cursors; "
                                "default: its type. Unique among the outputs.")  # fmt: skip
    queue_size: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Events waiting for the output at most; "
        "beyond, a catching-up output reads them from the journal, another drops them (counted).",
    )
    catch_up: bool = Field(
        True,
        description="After a stop, a reload or a queue that ran over, deliver what it missed from the journal, from "
        "the last event it delivered (stored in the journal under its id), then live, in order. Needs the journal.",
    )

    @property
    def name(self) -> str:
        return self.id or self.type  # type: ignore[attr-defined]

    def describe(self) -> str:
        """One line for `vigild check` (never a secret)."""
        raise NotImplementedError


class FileOutputConfig(OutputEntry):
    """Every event's wire JSON, one per line, appended to a file (JSON Lines)."""

    type: Literal["file"]
    path: Path = Field(description="The file the events are appended to (created 0640; relative: to the daemon's "
                       "working directory).")  # fmt: skip
    fsync: bool = Field(False, description="Sync the file to disk after each batch (slower; survives a power cut).")

    def describe(self) -> str:
        return f"file {self.path}" + (" (fsync)" if self.fsync else "")


def mqtt_topic_part(value: str, what: str) -> str:
    """A topic prefix (one or more levels): no wildcard, no NUL, no empty level, at most 128 bytes."""
    if not value or any(c in value for c in "+#\0"):
        raise ValueError(f"{what} must be non-empty without `+`, `#` or NUL (MQTT wildcards are not allowed in a "
                         "topic that is published to)")  # fmt: skip
    if any(not level for level in value.split("/")):
        raise ValueError(f"{what} has an empty level (a leading, trailing or doubled `/`)")
    if len(value.encode()) > 128:
        raise ValueError(f"{what} is longer than 128 bytes")
    return value


class MqttTls(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ca: Path | None = Field(None, description="CA certificate(s) (PEM) the broker's certificate must chain to; "
                            "default: the system's.")  # fmt: skip
    cert: Path | None = Field(None, description="Client certificate (PEM), for brokers that require one.")
    key: Path | None = Field(None, description="The client certificate's private key (PEM).")

    @model_validator(mode="after")
    def _pair(self) -> MqttTls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("`cert` and `key` go together: give both or neither")
        return self


class MqttOutputConfig(OutputEntry):
    """Events, retained state and Home Assistant discovery on an MQTT broker (docs/mqtt.md)."""

    type: Literal["mqtt"]
    url: str = Field(description="`mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (TLS, 8883).")
    username: str | None = Field(None, description="Use ${VAR} to take it from the environment.")
    password: SecretStr | None = Field(None, description="Use ${VAR} to take it from the environment; never shown.")
    protocol: Literal["3.1.1", "5"] = Field("3.1.1", description="MQTT protocol version.")
    tls: MqttTls = Field(MqttTls(), description="Certificates for `mqtts://`.")
    topic_prefix: str = Field("vigild", description="First level(s) of every topic this output publishes.")
    daemon_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = Field(
        None, description="This daemon's name on the broker (availability topic, client id, Home Assistant unique "
        "ids); default: the host name and 8 hex digits of the config file's path.")  # fmt: skip
    client_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")] | None = Field(
        None, description="MQTT client id; default `vigild-<daemon_id>-<output id>` (unique per daemon and output)."
    )
    keepalive: int = Field(30, ge=5, le=3600, description="Seconds between MQTT keepalive pings.")
    qos_events: Literal[0, 1, 2] = Field(1, description="QoS of events (1: at least once).")
    qos_heartbeats: Literal[0, 1] = Field(0, description="QoS of heartbeats.")
    inflight: int = Field(100, ge=1, le=65535, description="QoS 1/2 messages awaiting the broker's ack at most.")
    state: bool = Field(True, description="Publish retained state under `<prefix>/<camera>/state/...`.")
    snapshots: bool = Field(True, description="Publish the latest snapshot per camera and per zone (retained JPEG).")
    homeassistant: bool = Field(False, description="Publish Home Assistant discovery configs (needs `state`).")
    discovery_prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix.")
    commands: bool = Field(False, description="Subscribe to `<prefix>/<camera>/set/enabled` (ON/OFF) to pause and "
                           "resume a camera: anyone who can publish there can.")  # fmt: skip

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError("expected mqtt://host[:port] or mqtts://host[:port]")
        if parts.username or parts.password:
            raise ValueError("give the credentials as `username` and `password`, not in the URL")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port is not a number from 1 to 65535") from None
        if not parts.hostname or port == 0 or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("expected mqtt://host[:port] or mqtts://host[:port], without path or query")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return mqtt_topic_part(value, "the topic prefix")

    @field_validator("discovery_prefix")
    @classmethod
    def _discovery(cls, value: str) -> str:
        return mqtt_topic_part(value, "the discovery prefix")

    @model_validator(mode="after")
    def _consistent(self) -> MqttOutputConfig:
        if self.homeassistant and not self.state:
            raise ValueError("`homeassistant: true` needs `state: true` (its entities read the state topics)")
        if self.password is not None and self.username is None:
            raise ValueError("a `password` needs a `username`")
        return self

    def describe(self) -> str:
        user = (
            f" as {self.username}" + (" with a password" if self.password is not None else "") if self.username else ""
        )
        discovery = f", Home Assistant discovery under {self.discovery_prefix}/" if self.homeassistant else ""
        commands = ", commands on" if self.commands else ""
        return f"mqtt {self.url}{user} (MQTT {self.protocol}, topics under {self.topic_prefix}/{discovery}{commands})"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def secure(self) -> bool:
        return self.url.startswith("mqtts://")


class NatsOutputConfig(OutputEntry, NatsServer):
    """Events into a NATS JetStream stream, deduplicated by id (docs/cluster.md#the-nats-output)."""

    type: Literal["nats"]
    url: str | None = Field(None, description="`nats://host[:port]` (comma-separated for several); default: the "
                            "`cluster:` section's server, with its credentials and its one connection.")  # fmt: skip
    stream: Annotated[str, Field(pattern=BUCKET)] = Field("VIGILD", description="The JetStream stream (created if "
                                                          "missing, with the limits below).")  # fmt: skip
    subject_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(
        "vigild", description="Events go to `<prefix>.<camera>.<type>`; the stream takes `<prefix>.>`."
    )
    replicas: int = Field(1, ge=1, le=5, description="The stream's replicas, when vigild creates it.")
    storage: Literal["file", "memory"] = Field("file", description="The stream's storage, when vigild creates it.")
    max_age_days: float = Field(7.0, gt=0, le=3650, description="The stream keeps events this long (0: forever).")
    max_bytes: int = Field(-1, ge=-1, description="The stream's size limit in bytes (-1: none).")
    duplicate_window_s: float = Field(
        120.0, ge=1, le=86_400, description="JetStream drops a second event with the same id within this window: "
        "an outage longer than it can deliver an event twice (drop duplicates by `id`)."
    )  # fmt: skip
    snapshots: bool = Field(True, description="Publish each event's snapshot on `<prefix>_snapshots.<camera>` "
                            "(outside the stream); one larger than the server's max_payload is counted, not sent.")  # fmt: skip
    ack_timeout_s: float = Field(5.0, gt=0, le=600, description="Seconds to wait for the stream's acknowledgement "
                                 "before publishing again (deduplicated by id).")  # fmt: skip

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return nats_url(value) if value is not None else None

    def describe(self) -> str:
        where = self.url or "the cluster's NATS"
        return (f"nats {where} stream {self.stream} ({self.subject_prefix}.>, duplicate window "
                f"{self.duplicate_window_s:g} s)")  # fmt: skip


OutputConfig = Annotated[FileOutputConfig | MqttOutputConfig | NatsOutputConfig, Field(discriminator="type")]
"""Every output type's model."""
