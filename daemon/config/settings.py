"""The daemon's settings: typed, validated models of one YAML file, without loading anything.

Plugin sections stay raw here (`DaemonSettings.plugins`); vigild.config.loading resolves them with each plugin's own model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vigild.config.cluster import ClusterConfig
from vigild.config.motion import MotionConfig, effective_motion
from vigild.config.outputs import OutputConfig
from vigild.config.recording import CameraRecordingConfig, RecordingConfig, effective
from vigild.config.sources import SourceKind, parse_source
from vigild.events import SYSTEM_CAMERA
from vigild.plugin import MAX_NAME_LENGTH

_HOUR = 3600.0
"""Upper bound of the daemon's durations: a wait beyond threading.TIMEOUT_MAX (~292 years) raises OverflowError in
the thread that waits, so no duration may come near it."""
MAX_FRAME_SIDE = 8192
"""Largest frame width or height the daemon scales to (as for test:// sizes)."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ReconnectConfig(StrictModel):
    initial_delay: float = Field(1.0, gt=0, le=_HOUR, description="Seconds before the first retry.")
    max_delay: float = Field(
        30.0, gt=0, le=_HOUR, description="Retries back off exponentially up to this many seconds."
    )
    jitter: float = Field(
        0.2, ge=0, le=1, description="Random fraction added to each delay, so cameras do not retry in step."
    )


def _not_reserved(name: str) -> str:
    if name == SYSTEM_CAMERA:
        raise ValueError(f"'{SYSTEM_CAMERA}' is reserved for daemon events; choose another camera name")
    return name


CameraName = Annotated[
    str, Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=MAX_NAME_LENGTH), AfterValidator(_not_reserved)
]
"""Letters, digits, `_` and `-`, at most 64: a name is one segment of the event topic `vigild.<camera>.<type>`."""


class RtspConfig(StrictModel):
    transport: Literal["tcp", "udp", "auto"] = Field(
        "tcp", description="`tcp` (interleaved, works through NAT and firewalls), `udp`, or `auto` (UDP, then TCP)."
    )
    latency_ms: int = Field(
        200, ge=0, description="Jitter buffer: how long RTP packets may wait to be reordered before decoding."
    )


CaptureBackend = Literal["auto", "gstreamer", "opencv"]


ShapeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=MAX_NAME_LENGTH)]
FrameSide = Annotated[int, Field(gt=0, le=MAX_FRAME_SIDE)]


class CameraConfig(StrictModel):
    source: str = Field(
        description="A file path, file://, rtsp(s)://, http(s):// (MJPEG, HLS), /dev/videoN or a camera index, "
        "or test://<pattern> (docs/capture.md)."
    )
    backend: CaptureBackend = Field(
        "auto", description="Capture back end; `auto`: GStreamer when it is installed, else OpenCV."
    )
    decoder: Literal["auto", "software"] = Field(
        "auto", description="`auto`: a hardware decoder when the machine has one, else software; `software`: never."
    )
    username: str | None = Field(None, description="RTSP/HTTP user; use ${VAR} to take it from the environment.")
    password: SecretStr | None = Field(
        None, description="RTSP/HTTP password; use ${VAR} to take it from the environment. Never logged."
    )
    rtsp: RtspConfig = RtspConfig()
    stall_timeout: float = Field(
        10.0, gt=0, le=_HOUR, description="Seconds without a frame after which the source is torn down and reopened."
    )
    fps: float | None = Field(
        None, gt=0, le=1000, description="Process at most this many frames per second (0.001 to 1000)."
    )
    resize: tuple[FrameSide, FrameSide] | None = Field(
        None, description="[width, height] to scale frames to before the chain sees them; each at most 8192."
    )
    realtime: bool = Field(
        True,
        description="Files: play at the file's own frame rate like a camera; false reads as fast as the chain consumes.",
    )
    loop: bool = Field(False, description="Files: start again at the end instead of ending the camera.")
    enabled: bool = True
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-plugin overrides by plugin id: parameters, or `enabled: false`."
    )
    reconnect: ReconnectConfig = ReconnectConfig()
    zones: dict[ShapeName, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named polygons for the analytics plugin (docs/analytics.md), which validates them (its "
        "`camera_settings`) when the config is loaded.",
    )
    lines: dict[ShapeName, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named directed lines for the analytics plugin (docs/analytics.md), which validates them.",
    )
    recording: CameraRecordingConfig | None = Field(
        None, description="This camera's recording (docs/recording.md): overrides the top-level section's keys."
    )
    motion: MotionConfig | None = Field(
        None, description="This camera's motion gating (docs/motion.md): overrides the top-level section's keys; "
        "`motion: {}` turns it on for this camera alone, `motion: {enabled: false}` off."
    )

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        parse_source(value)  # raises ValueError naming what was expected
        return value

    @field_validator("fps")
    @classmethod
    def _not_too_slow(cls, value: float | None) -> float | None:
        if value is not None and value < 0.001:  # its period, in ns, would overflow the readers' integers
            raise ValueError("at least 0.001 (one frame in 1000 s)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CameraConfig:
        """Values only: whether this machine has the back end is asked where capture starts (vigild.config.backends)."""
        if self.backend == "opencv" and parse_source(self.source).kind is SourceKind.TEST:
            raise ValueError("source: test:// patterns need the GStreamer back end, but backend: opencv")
        return self


class SchedulerConfig(StrictModel):
    max_batch: int = Field(
        8, ge=1, le=1024, description="Most frames (from all cameras) in one batch through the chain (at most 1024)."
    )
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long a batch waits for more frames once it has one."
    )
    pipeline: bool | None = Field(
        None,
        description="Overlap batches: the next batch's detection (letterbox, upload, forward pass, NMS) runs on the "
        "detector's own thread while the scheduler finishes the one before (tracking, analytics, events). Default: "
        "on with a GPU, off on a CPU (where it measured slower).",
    )


class CaptureSettings(StrictModel):
    workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        "auto",
        description="Processes that decode the cameras, frames handed over in shared memory (docs/capture.md); 0: "
        "capture threads in the daemon. auto: 0 below 8 usable CPUs, else one per 4 CPUs (at most one per camera, "
        "16 in all); the environment variable VIGILD_CAPTURE_WORKERS, when set, decides auto instead.",
    )
    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> object:
        """One message for both spellings (pydantic would report the int and the 'auto' branch apart)."""
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 64:
            return value
        raise ValueError("expected auto or a number of worker processes from 0 to 64")

    slots: int = Field(
        8,
        ge=4,
        le=64,
        description="Frames in shared memory per camera (with workers): the one being written, the one waiting, the "
        "batch in the chain, the last frame kept for snapshots, two for each branch (the frame waiting for it and "
        "the one it works on), and spares for plugins that hold a frame.",
    )


class PublisherConfig(StrictModel):
    endpoint: str = Field("tcp://127.0.0.1:5555", description="ZeroMQ endpoint the PUB socket binds.")
    hwm: int = Field(
        1000, ge=1, le=1_000_000, description="ZeroMQ send high-water mark per subscriber, in messages."
    )
    queue_size: int = Field(
        10000, ge=1, le=1_000_000, description="Events waiting for the publisher thread before new ones are dropped."
    )
    heartbeat_interval: float = Field(
        1.0, gt=0, le=_HOUR, description="Seconds between `vigild.sys.heartbeat` messages."
    )
    linger_ms: int = Field(
        1000, ge=0, le=60_000, description="How long closing waits to flush queued messages."
    )
    await_subscribers: int = Field(
        0,
        ge=0,
        le=1000,
        description="Hold capture at start until this many subscriptions have reached the publisher (at most "
        "`await_timeout` seconds), so that subscribers started beforehand miss no first event; 0: do not wait.",
    )
    await_timeout: float = Field(
        30.0,
        gt=0,
        le=_HOUR,
        description="Seconds `await_subscribers` waits before capture starts anyway.",
    )

    @field_validator("endpoint")
    @classmethod
    def _known_transport(cls, value: str) -> str:
        if not value.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError("expected a ZeroMQ endpoint such as tcp://127.0.0.1:5555 or ipc:///run/vigild/events")
        if value.startswith("tcp://") and not re.search(r":(\d+|\*)$", value):
            raise ValueError("a tcp:// endpoint needs a port (or *), such as tcp://127.0.0.1:5555")
        return value


class JournalConfig(StrictModel):
    """The event journal (docs/events.md#history): every event and its snapshot, kept in SQLite beside the stream."""

    enabled: bool = Field(True, description="Keep the journal; off: no history, no replay, `seq` starts at 1 each run.")
    path: Path | None = Field(
        None,
        description="The journal's database file (its snapshots go in `snapshots/` beside it); default "
        "$STATE_DIRECTORY/journal.db under systemd, else $XDG_STATE_HOME/vigild/<config name>-<hash>/journal.db "
        "(~/.local/state/... without XDG_STATE_HOME): one journal per config file.",
    )
    retention_days: float = Field(
        30.0, gt=0, le=36_500, description="Events older than this many days are removed with their snapshots."
    )
    max_size_mb: float = Field(
        10_240, gt=0, le=1 << 30, description="The journal's size cap, database plus snapshots; the oldest go first."
    )
    replay_endpoint: str | None = Field(
        None,
        description="ZeroMQ endpoint of the replay socket that resuming subscribers fill their gaps from; default: "
        "ipc://<runtime directory>/replay (mode 0660: the daemon's user and group; docs/events.md#resume). CURVE as "
        "the publisher; a tcp:// one without CURVE is logged INSECURE, loopback included.",
    )

    @field_validator("replay_endpoint")
    @classmethod
    def _known_transport(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("tcp://", "ipc://")):
            raise ValueError("expected a ZeroMQ endpoint such as tcp://127.0.0.1:5556 or ipc:///run/vigild/replay")
        return value


class ControlConfig(StrictModel):
    enabled: bool = Field(True, description="Serve the control socket (`vigild ctl`, docs/control.md).")
    endpoint: str | None = Field(
        None,
        description="ZeroMQ endpoint the control socket binds; default ipc://$RUNTIME_DIRECTORY/control under "
        "systemd, else ipc://$XDG_RUNTIME_DIR/vigild/control, else run/control in the config's state directory "
        "(docs/service.md#the-state-directory), owner-only.",
    )
    timeout: float = Field(
        10.0,
        gt=0,
        le=_HOUR,
        description="Seconds a change waits for the configuration lock or the scheduler before answering `busy`.",
    )
    max_cameras: int = Field(
        64,
        ge=1,
        le=10_000,
        description="A control client's `cameras add` is refused (`forbidden`) once this many cameras are "
        "configured, so that clients cannot grow the daemon without bound; the config file itself may hold more.",
    )
    max_instances: int = Field(
        16,
        ge=0,
        le=10_000,
        description="Plugin instances (each with its own model; a process of its own under `branch: process`) that "
        "control clients' camera changes may add beyond those of the config file: cameras with the same effective "
        "plugin settings share one, each distinct per-camera override makes one. A change past it is refused "
        "(`invalid_config`); `vigild ctl status` counts them (`plugin_instances`).",
    )

    @field_validator("endpoint")
    @classmethod
    def _known_transport(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("tcp://", "ipc://")):
            raise ValueError("expected ipc://PATH or tcp://127.0.0.1:PORT")
        return value


class CurveConfig(StrictModel):
    """ZeroMQ CURVE on the publisher and the control socket: only clients whose public key is authorised connect."""

    secret_key: Path = Field(description="The server's secret certificate (`vigild keygen` writes NAME.key_secret).")
    authorized_keys: Path = Field(
        description="Directory of authorised clients' public certificates (NAME.key); re-read on reload."
    )

    @field_validator("secret_key")
    @classmethod
    def _readable_secret(cls, value: Path) -> Path:
        import zmq.auth

        try:
            _, secret = zmq.auth.load_certificate(value)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read a certificate from {value}: {exc}") from None
        if secret is None:
            raise ValueError(f"{value} holds no secret key (give the .key_secret file `vigild keygen` wrote)")
        return value

    @field_validator("authorized_keys")
    @classmethod
    def _directory(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"not a directory: {value}")
        return value


class MetricsConfig(StrictModel):
    enabled: bool = Field(
        False, description="Serve Prometheus metrics over HTTP (off by default, so two daemons never collide)."
    )
    address: str = Field("127.0.0.1", description="Address the metrics server binds.")
    port: int = Field(9108, ge=0, le=65535, description="TCP port of `/metrics`.")


class WebTls(StrictModel):
    cert: Path = Field(description="Certificate chain (PEM) the console serves.")
    key: Path = Field(description="Its private key (PEM).")


class WebConfig(StrictModel):
    """The web console (docs/web.md): off unless the section is there (`web: {}` turns it on)."""

    listen: str = Field("127.0.0.1:8080", description="HOST:PORT the console binds (port 0: any free port).")
    tls: WebTls | None = Field(None, description="Serve HTTPS with this certificate and key.")
    insecure: bool = Field(False, description="Allow a bind beyond loopback without TLS (logged as INSECURE).")
    live_fps: float = Field(5.0, gt=0, le=60, description="Live pictures per second per camera, at most.")
    live_quality: int = Field(80, ge=10, le=100, description="JPEG quality of the live pictures.")
    live_max_side: int = Field(
        1280, ge=64, le=MAX_FRAME_SIDE, description="Live pictures are scaled to at most this many pixels a side."
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("expected HOST:PORT, for example 127.0.0.1:8080")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def loopback(self) -> bool:
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @model_validator(mode="after")
    def _safe_bind(self) -> WebConfig:
        if not self.loopback and self.tls is None and not self.insecure:
            raise ValueError(f"the console would listen on {self.host}, beyond loopback, without TLS: give `tls` "
                             "(cert and key) or set `insecure: true` (anyone on the network could watch the cameras "
                             "if they get the token)")  # fmt: skip
        return self


class DaemonSettings(StrictModel):
    """The top level of the file, with the plugin list still raw (its entries are validated per plugin)."""

    cameras: dict[CameraName, CameraConfig] = Field(min_length=1)
    plugins: list[dict[str, Any]] = Field(default_factory=list)
    publisher: PublisherConfig = PublisherConfig()
    journal: JournalConfig = JournalConfig()
    cluster: ClusterConfig | None = Field(
        None, description="Share the cameras with other daemons through NATS JetStream leases (docs/cluster.md)."
    )
    outputs: list[OutputConfig] = Field(default_factory=list, description="Further outputs (docs/outputs.md).")
    scheduler: SchedulerConfig = SchedulerConfig()
    capture: CaptureSettings = CaptureSettings()
    control: ControlConfig = ControlConfig()
    curve: CurveConfig | None = Field(None, description="Require CURVE authentication (docs/security.md).")
    metrics: MetricsConfig = MetricsConfig()
    web: WebConfig | None = Field(None, description="The web console (docs/web.md); `web: {}` turns it on.")
    recording: RecordingConfig | None = Field(
        None, description="Clips around events and continuous segments (docs/recording.md); off without it."
    )
    motion: MotionConfig | None = Field(
        None, description="Detect only where and when something moved (docs/motion.md), for every camera; "
        "`motion: {}` turns it on with the defaults. Off without it."
    )
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads for torch and OpenCV; default: the CPUs the daemon may use (its affinity, capped by "
        "its cgroup CPU quota), whatever OMP_NUM_THREADS or MKL_NUM_THREADS say. Reported in the heartbeat.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def camera_motion(self, name: str) -> MotionConfig | None:
        """Camera `name`'s motion settings (the top level's, overridden by its own); None: every frame detected."""
        return effective_motion(self.motion, self.cameras[name].motion)

    def motion_by_camera(self) -> dict[str, MotionConfig]:
        """The cameras whose frames are gated by motion, with their settings."""
        return {name: motion for name in self.cameras if (motion := self.camera_motion(name)) is not None}

    def camera_recording(self, name: str) -> CameraRecordingConfig | None:
        """Camera `name`'s recording settings (the top level's, overridden by its own); None: not recorded."""
        return effective(self.recording, self.cameras[name].recording)

    @field_validator("recording")
    @classmethod
    def _recording_possible(cls, value: RecordingConfig | None, info: ValidationInfo) -> RecordingConfig | None:
        """Checked here (not on the whole model) so that the error names `recording` and its line."""
        cameras: dict[str, CameraConfig] = info.data.get("cameras") or {}
        journal: JournalConfig | None = info.data.get("journal")
        if value is None or not value.enabled:
            return value
        recorded = [name for name, camera in cameras.items() if effective(value, camera.recording) is not None]
        if cameras and not recorded:
            raise ValueError("no camera records anything: give `events` (what starts a clip) or `continuous`, at "
                             "the top or under a camera")  # fmt: skip
        if journal is not None and not journal.enabled:
            raise ValueError("recording needs the journal (clips are found from their events there): remove "
                             "`journal: {enabled: false}` or this section")  # fmt: skip
        for name in recorded:
            if cameras[name].backend == "opencv":
                raise ValueError(f"camera {name} has `backend: opencv`, but recording keeps the camera's own encoded "
                                 "stream, which only the GStreamer back end gives: set `backend: gstreamer` (or "
                                 f"auto), or `recording: {{enabled: false}}` under camera {name}")  # fmt: skip
        return value

    @field_validator("outputs")
    @classmethod
    def _nats_output_server(cls, value: list[OutputConfig], info: ValidationInfo) -> list[OutputConfig]:
        """A nats output without `url` shares the cluster's server (`cluster` is validated before `outputs`)."""
        if "cluster" in info.data and info.data["cluster"] is None:  # absent, rather than wrong (reported itself)
            for position, entry in enumerate(value):
                if getattr(entry, "type", None) == "nats" and entry.url is None:  # type: ignore[union-attr]
                    raise ValueError(f"outputs.{position}: a nats output needs `url` (or a `cluster:` section, "
                                     "whose server it then shares)")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _camera_recording_possible(self) -> DaemonSettings:
        """Cameras with a `recording:` of their own (and no top-level section, which is checked above)."""
        for name, camera in self.cameras.items():
            if self.recording is None and camera.recording is not None and camera.recording.records:
                if not self.journal.enabled:
                    raise ValueError(f"cameras.{name}.recording needs the journal (clips are found from their "
                                     "events there): remove `journal: {enabled: false}`")  # fmt: skip
                if camera.backend == "opencv":
                    raise ValueError(f"cameras.{name}.recording keeps the camera's own encoded stream, which only "
                                     "the GStreamer back end gives: set `backend: gstreamer` (or auto)")  # fmt: skip
        return self

    @field_validator("outputs")
    @classmethod
    def _unique_output_ids(cls, value: list[OutputConfig]) -> list[OutputConfig]:
        seen: dict[str, int] = {"publisher": -1, "journal": -1}
        for i, entry in enumerate(value):
            name = entry.name
            if name in seen:
                taken = f"entry {seen[name]}'s" if seen[name] >= 0 else "the built-in output's"
                raise ValueError(f"entry {i}'s id {name!r} is {taken} too: give each output an `id` of its own")
            seen[name] = i
        return value
