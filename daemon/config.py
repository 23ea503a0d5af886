"""The daemon's configuration: typed models for one YAML file, and `load_config` that validates it whole.

Every problem is reported as `file:line: key.path: what was expected`, all of them at once, so a user fixes a
config in one round. Plugin sections are validated by the plugin's own `Config` model, found by `type`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from vigild.events import SYSTEM_CAMERA
from vigild.geometry import LineConfig, ZoneConfig
from vigild.gst_pipeline import resolve_backend
from vigild.plugin import MAX_NAME_LENGTH, PLUGIN_ID_PATTERN, Plugin, PluginConfig
from vigild.registry import PluginLookupError, load_plugin_class
from vigild.sources import SourceKind, SourceSpec, parse_source, redact
from vigild.yamlsource import ConfigError, KeyPath, Problem, YamlDocument, expand_env, load_yaml

_BOOL = TypeAdapter(bool)
_HOUR = 3600.0
"""Upper bound of the daemon's durations: a wait beyond threading.TIMEOUT_MAX (~292 years) raises OverflowError in
the thread that waits, so no duration may come near it."""
MAX_FRAME_SIDE = 8192
"""Largest frame width or height the daemon scales to (as for test:// sizes)."""
_SECRET_KEYS = frozenset({"password", "username"})
"""Keys whose value a config error never shows, not even when it is of the wrong type."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ControlRefused(ConfigError):
    """A control client's camera names what only the config file may: a local file, or a file a plugin loads.

    The control socket answers it with the code `forbidden` (its `forbidden` attribute)."""

    forbidden = True


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
    zones: dict[ShapeName, ZoneConfig] = Field(
        default_factory=dict, description="Named polygons for the analytics plugin (docs/analytics.md)."
    )
    lines: dict[ShapeName, LineConfig] = Field(
        default_factory=dict, description="Named directed lines for the analytics plugin (docs/analytics.md)."
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
    def _backend_can_open(self) -> CameraConfig:
        if self.backend == "gstreamer" and resolve_backend("auto") != "gstreamer":
            raise ValueError(
                "backend: gstreamer, but GStreamer or PyGObject is not installed (pip install vigild[gstreamer]); "
                "use backend: auto or opencv"
            )
        if self.resize is not None:  # the frame's size is known: pixel points must lie on it
            width, height = self.resize
            for kind_name, shapes in (("zones", self.zones), ("lines", self.lines)):
                for name, shape in shapes.items():
                    if not shape.normalized and any(x > width or y > height for x, y in shape.points):
                        raise ValueError(
                            f"{kind_name}.{name}: a point lies outside the {width}x{height} frame set by resize"
                        )
        kind = parse_source(self.source).kind
        if kind is SourceKind.TEST and resolve_backend(self.backend) == "opencv":
            why = "backend: opencv" if self.backend == "opencv" else "GStreamer is not installed (pip install vigild[gstreamer])"
            raise ValueError(f"source: test:// patterns need the GStreamer back end, but {why}")
        return self


class SchedulerConfig(StrictModel):
    max_batch: int = Field(
        8, ge=1, le=1024, description="Most frames (from all cameras) in one batch through the chain (at most 1024)."
    )
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long a batch waits for more frames once it has one."
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
        return value


class ControlConfig(StrictModel):
    enabled: bool = Field(True, description="Serve the control socket (`vigild ctl`, docs/control.md).")
    endpoint: str | None = Field(
        None,
        description="ZeroMQ endpoint the control socket binds; default ipc://$RUNTIME_DIRECTORY/control under "
        "systemd, else ipc://$XDG_RUNTIME_DIR/vigild/control (or ~/.local/state/vigild/control), owner-only.",
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


class DaemonSettings(StrictModel):
    """The top level of the file, with the plugin list still raw (its entries are validated per plugin)."""

    cameras: dict[CameraName, CameraConfig] = Field(min_length=1)
    plugins: list[dict[str, Any]] = Field(default_factory=list)
    publisher: PublisherConfig = PublisherConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    control: ControlConfig = ControlConfig()
    curve: CurveConfig | None = Field(None, description="Require CURVE authentication (docs/security.md).")
    metrics: MetricsConfig = MetricsConfig()
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads for torch and OpenCV; default: the CPUs the daemon may use (its affinity, capped by "
        "its cgroup CPU quota), whatever OMP_NUM_THREADS or MKL_NUM_THREADS say. Reported in the heartbeat.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


@dataclass(frozen=True)
class PluginSpec:
    """One entry of the chain, resolved: its class, its own config, and each camera's effective config."""

    id: str
    cls: type[Plugin]
    config: PluginConfig
    per_camera: Mapping[str, PluginConfig]
    """Effective config for each enabled camera that runs this plugin (with its overrides applied)."""


@dataclass(frozen=True)
class Config:
    file: Path
    settings: DaemonSettings
    chain: tuple[PluginSpec, ...]
    document: YamlDocument
    """The parsed file, kept to point at lines when a plugin finds a problem only at start."""

    def error(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError(self.file, [self.document.problem(path, message)])

    @property
    def cameras(self) -> dict[str, CameraConfig]:
        return {name: cam for name, cam in self.settings.cameras.items() if cam.enabled}

    def source(self, camera: str) -> SourceSpec:
        """The camera's parsed source; relative file paths are taken from the config file's directory."""
        return parse_source(self.settings.cameras[camera].source, self.file.parent)


def load_config(file: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a config file; raises `ConfigError` listing every problem found."""
    document = load_yaml(file)
    problems = expand_env(document, environ)
    if problems:
        raise ConfigError(document.file, problems)
    return validate_document(document)


def load_control_settings(file: str | Path, environ: Mapping[str, str] | None = None) -> ControlConfig:
    """Only the `control:` section of a config file, for `vigild ctl --config`: read and expanded like the whole
    file, but no plugin is imported and no capture back end resolved, so a client loads neither torch, OpenCV nor
    GStreamer; the rest of the file is the daemon's to validate. Raises `ConfigError` for that section."""
    document = load_yaml(file)
    problems = [problem for problem in expand_env(document, environ) if problem.path[:1] == ("control",)]
    if problems:  # an unset variable elsewhere (a camera's password, say) is no concern of a client
        raise ConfigError(document.file, problems)
    section = (document.data.get("control") if isinstance(document.data, dict) else None) or {}
    try:
        return ControlConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(document.file, _problems(document, exc, ("control",), ControlConfig)) from None


def with_camera(config: Config, name: str, camera: dict[str, Any] | None) -> Config:
    """`config` with camera `name` set to `camera` (raw, as a control client sent it: never `${VAR}`-expanded) or
    removed (None), validated whole. Raises `ControlRefused`, changing nothing, where `camera` names a file."""
    data = copy.deepcopy(config.document.data)
    cameras = data.setdefault("cameras", {})
    if camera is None:
        cameras.pop(name, None)
    else:
        refused = _admin_only(config, name, camera)
        limit = config.settings.control.max_cameras
        if name not in config.settings.cameras and len(config.settings.cameras) >= limit:
            refused.append(
                Problem(
                    ("cameras", name),
                    f"{len(config.settings.cameras)} cameras are configured, the most a control client may reach "
                    f"(control.max_cameras: {limit}); remove one first, or raise the limit in the config file",
                )
            )
        if refused:
            raise ControlRefused(config.file, refused)
        cameras[name] = camera
    return validate_document(YamlDocument(config.file, data, config.document.lines))


def _admin_only(config: Config, name: str, camera: dict[str, Any]) -> list[Problem]:
    """What in a control client's `camera` only the config file may set: a local file as `source`, and a plugin
    override of one of the plugin's `admin_only_keys` (files it loads). A value the running config already gives
    this same camera is no new file, so `cameras update` can send an admin-written camera back unchanged.
    Decided from the keys and the source's form alone: the reply never tells whether a path exists."""
    old = config.settings.cameras.get(name)
    path: KeyPath = ("cameras", name)
    problems = []
    source = camera.get("source")
    if isinstance(source, str) and (old is None or source != old.source):
        try:
            local = parse_source(source).kind is SourceKind.FILE  # parsing only: no look at the file system
        except ValueError:
            local = False  # not a source at all: validation says what was expected
        if local:
            problems.append(
                Problem(
                    (*path, "source"),
                    "a local file can be a source only in the config file, not through the control socket "
                    "(rtsp://, rtsps://, http(s)://, /dev/videoN and test:// can)",
                )
            )
    overrides = camera.get("plugins")
    if isinstance(overrides, dict):
        classes = {spec.id: spec.cls for spec in config.chain}
        for plugin_id, override in overrides.items():
            cls = classes.get(plugin_id)
            if cls is None or not isinstance(override, dict):
                continue  # validation reports an unknown id or a non-mapping
            before = old.plugins.get(plugin_id, {}) if old is not None else {}
            for key in sorted(cls.Config.admin_only_keys() & set(override)):
                if key in before and before[key] == override[key]:
                    continue
                problems.append(
                    Problem(
                        (*path, "plugins", plugin_id, key),
                        f"`{key}` names what the plugin loads: it can be set only in the config file, "
                        "not through the control socket",
                    )
                )
    return problems


def validate_document(document: YamlDocument) -> Config:
    """Validate a loaded (and expanded) document whole; raises `ConfigError` listing every problem found."""
    if not isinstance(document.data, dict):
        raise ConfigError(document.file, [document.problem((), "expected a mapping with at least `cameras:`")])
    try:
        settings = DaemonSettings.model_validate(document.data)
    except ValidationError as exc:
        raise ConfigError(document.file, _problems(document, exc, (), DaemonSettings)) from None
    chain, problems = _resolve_chain(document, settings)
    if problems:
        raise ConfigError(document.file, problems)
    return Config(document.file, settings, tuple(chain), document)


def _resolve_chain(document: YamlDocument, settings: DaemonSettings) -> tuple[list[PluginSpec], list[Problem]]:
    problems: list[Problem] = []
    chain: list[PluginSpec] = []
    ids: dict[str, int] = {}
    for position, raw in enumerate(settings.plugins):
        path: KeyPath = ("plugins", position)
        type_name = raw.get("type")
        if not isinstance(type_name, str):
            problems.append(document.problem((*path, "type"), "every plugin needs `type:` naming the plugin"))
            continue
        try:
            cls = load_plugin_class(type_name)
        except PluginLookupError as exc:
            problems.append(document.problem((*path, "type"), str(exc)))
            continue
        try:
            base = cls.Config.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_problems(document, exc, path, cls.Config))
            continue
        plugin_id = base.id or base.type
        if plugin_id in ids:
            problems.append(
                document.problem(
                    (*path, "id"),
                    f"plugin id '{plugin_id}' is already used by plugins.{ids[plugin_id]}; set a distinct `id:`",
                )
            )
            continue
        ids[plugin_id] = position
        per_camera, camera_problems = _per_camera_configs(document, settings, cls, raw, base, plugin_id, path)
        problems.extend(camera_problems)
        chain.append(PluginSpec(plugin_id, cls, base, per_camera))

    for name, camera in settings.cameras.items():
        for plugin_id in camera.plugins:
            if plugin_id not in ids:
                known = ", ".join(ids) or "none"
                problems.append(
                    document.problem(
                        ("cameras", name, "plugins", plugin_id),
                        f"no plugin with id '{plugin_id}' in `plugins:` (ids: {known})",
                    )
                )
    return chain, problems


def _per_camera_configs(
    document: YamlDocument,
    settings: DaemonSettings,
    cls: type[Plugin],
    raw: dict[str, Any],
    base: PluginConfig,
    plugin_id: str,
    path: KeyPath,
) -> tuple[dict[str, PluginConfig], list[Problem]]:
    problems: list[Problem] = []
    per_camera: dict[str, PluginConfig] = {}
    for name, camera in settings.cameras.items():
        if not camera.enabled:
            continue
        override = dict(camera.plugins.get(plugin_id, {}))
        override_path: KeyPath = ("cameras", name, "plugins", plugin_id)
        try:
            enabled = _BOOL.validate_python(override.pop("enabled", True))  # also "false" from ${VAR}
        except ValidationError as exc:
            problems.append(document.problem((*override_path, "enabled"), _describe(exc.errors()[0], cls.Config, ())))
            continue
        if not enabled:
            continue
        if not override:
            per_camera[name] = base
            continue
        for fixed in ("type", "id"):
            if fixed in override:
                problems.append(document.problem((*override_path, fixed), f"`{fixed}` cannot be overridden per camera"))
        try:
            per_camera[name] = cls.Config.model_validate({**raw, **override})
        except ValidationError as exc:
            for problem in _problems(document, exc, (), cls.Config):
                key = problem.path[0] if problem.path else None
                where = override_path if key in override else path
                problems.append(document.problem((*where, *problem.path), problem.message))
    return per_camera, problems


def _problems(document: YamlDocument, exc: ValidationError, prefix: KeyPath, model: type[BaseModel]) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(
            part
            for part in error["loc"]
            if not (isinstance(part, str) and (part.startswith("function-") or part == "[key]"))
        )
        path = (*prefix, *loc)
        problem = document.problem(path, _describe(error, model, loc))
        shown = tuple(_shorten(part) if isinstance(part, str) else part for part in path)  # a 70,000-character name
        problems.append(Problem(shown, problem.message, problem.line))
    return problems


def _shorten(text: str, most: int = 80) -> str:
    return text if len(text) <= most else f"{text[: most - 20]}... ({len(text)} characters)"


def _describe(error: Mapping[str, Any], model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key{hint}"
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    given = error.get("input")
    keys = [part for part in error["loc"] if isinstance(part, str)]
    secret = bool(keys) and keys[-1] in _SECRET_KEYS
    if given is not None and not secret and not isinstance(given, (dict, list)):
        message += f", got {_shorten(json.dumps(given) if isinstance(given, str) else repr(given))}"
    return redact(message)  # a source URI with a password (perhaps from ${VAR}) is shown masked


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found at `loc` inside `model`, for 'unknown key' hints (best effort)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        if isinstance(part, str) and part in current.model_fields:
            current = _model_in(current.model_fields[part].annotation)
        else:  # a dict key or list index: the container's item model was already chosen
            continue
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `X`, `X | None`, `dict[str, X]` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in reversed(getattr(annotation, "__args__", ()) or ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


__all__ = [
    "PLUGIN_ID_PATTERN",
    "CameraConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "ControlRefused",
    "CurveConfig",
    "DaemonSettings",
    "MetricsConfig",
    "PluginSpec",
    "PublisherConfig",
    "SchedulerConfig",
    "load_config",
    "load_control_settings",
]
