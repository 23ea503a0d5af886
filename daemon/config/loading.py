"""The daemon's configuration: `load_config` reads one YAML file and validates it whole, resolving each plugin
section with the plugin's own `Config` model (found by `type`); `with_camera` applies a control client's camera.

Every problem is reported as `file:line: key.path: what was expected`, all of them at once, so a user fixes a
config in one round. Once every plugin entry resolved, the chain is checked camera by camera against what each
plugin requires and provides (`Plugin.requirements`, `Plugin.provides`). The typed settings live in vigild.config.settings, the wording of errors in vigild.config.errors;
both are re-exported here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from vigild.capture.backends import BackendUnavailable, camera_backend
from vigild.capture.sources import SourceKind, SourceSpec, parse_source
from vigild.config.errors import describe, problems_of
from vigild.config.settings import (
    MAX_FRAME_SIDE,
    CameraConfig,
    ControlConfig,
    CurveConfig,
    DaemonSettings,
    MetricsConfig,
    PublisherConfig,
    ReconnectConfig,
    RtspConfig,
    SchedulerConfig,
    StrictModel,
)
from vigild.config.yamlsource import ConfigError, KeyPath, Problem, YamlDocument, expand_env, load_yaml
from vigild.pipeline.registry import PluginLookupError, load_plugin_class
from vigild.plugin import CAPABILITIES, PLUGIN_ID_PATTERN, Plugin, PluginConfig

_BOOL = TypeAdapter(bool)


class ControlRefused(ConfigError):
    """A control client's camera names what only the config file may: a local file, or a file a plugin loads.

    The control socket answers it with the code `forbidden` (its `forbidden` attribute)."""

    forbidden = True


@dataclass(frozen=True)
class PluginSpec:
    """One entry of the chain, resolved: its class, its own config, and each camera's effective config."""

    id: str
    cls: type[Plugin]
    config: PluginConfig
    per_camera: Mapping[str, PluginConfig]
    """Effective config for each enabled camera that runs this plugin (with its overrides applied)."""

    @property
    def branch(self) -> bool:
        """Runs beside the chain (vigild.pipeline.branch): `branch:` in its entry, else the plugin's own default."""
        return bool(self.config.branch) if self.config.branch is not None else self.cls.branch_default

    @property
    def in_process(self) -> bool:
        """A whole branch in a process of its own (`branch: process`; vigild.pipeline.branch_process)."""
        return self.config.branch == "process"

    @property
    def whole_branch(self) -> bool:
        """The chain runs the whole plugin beside it (a `Branch`); a branch plugin that `splits` stays in the chain
        and runs its slow part on a worker of its own."""
        return self.branch and not self.cls.splits


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

    def backends(self, cameras: Iterable[str] | None = None) -> dict[str, str]:
        """The capture back end (`gstreamer`, `opencv`) of each enabled camera, or of `cameras`, on this machine;
        raises `ConfigError` naming each camera that none can capture here. Imports GStreamer: asked by `vigild
        check` and `run` and for a control client's camera, never by loading a config."""
        found: dict[str, str] = {}
        problems = []
        for name in self.cameras if cameras is None else cameras:
            try:
                found[name] = camera_backend(self.settings.cameras[name], self.source(name).kind)
            except BackendUnavailable as exc:
                problems.append(self.document.problem(("cameras", name), str(exc)))
        if problems:
            raise ConfigError(self.file, problems)
        return found


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
    return load_section(file, "control", ControlConfig, environ)


M = TypeVar("M", bound=BaseModel)


def load_section(file: str | Path, key: str, model: type[M], environ: Mapping[str, str] | None = None) -> M:
    """One top-level section of a config file (`control`, `journal`, `publisher`) as a client needs it, read and
    expanded like the whole file, without importing a plugin; raises `ConfigError` for that section."""
    document = load_yaml(file)
    problems = [problem for problem in expand_env(document, environ) if problem.path[:1] == (key,)]
    if problems:  # an unset variable elsewhere (a camera's password, say) is no concern of a client
        raise ConfigError(document.file, problems)
    section = (document.data.get(key) if isinstance(document.data, dict) else None) or {}
    try:
        return model.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(document.file, problems_of(document, exc, (key,), model)) from None


def with_camera(config: Config, name: str, camera: dict[str, Any] | None) -> Config:
    """`config` with camera `name` set to `camera` (raw, as a control client sent it: never `${VAR}`-expanded) or
    removed (None), validated whole, with the camera's capture back end available here. Raises `ConfigError`, or
    `ControlRefused` where `camera` names a file, changing nothing."""
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
    changed = validate_document(YamlDocument(config.file, data, config.document.lines))
    if name in changed.cameras:
        changed.backends([name])  # capture would start at once: a back end not installed here refuses it now
    return changed


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
        raise ConfigError(document.file, problems_of(document, exc, (), DaemonSettings)) from None
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
            problems.extend(problems_of(document, exc, path, cls.Config))
            continue
        plugin_id = base.id or base.type
        if base.branch and not cls.branchable:
            problems.append(
                document.problem(
                    (*path, "branch"),
                    f"plugin type '{type_name}' cannot run as a branch: later plugins need what it adds to each frame, "
                    "or it keeps state from frame to frame (remove `branch:`)",
                )
            )
            continue
        if base.branch == "process" and cls.splits:
            problems.append(
                document.problem(
                    (*path, "branch"),
                    f"plugin type '{type_name}' runs its slow part beside the chain on a thread of its own and cuts "
                    "its input in the chain: it cannot run in a process (use `branch: true`, or `false`)",
                )
            )
            continue
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
    problems.extend(_camera_settings_problems(document, settings, chain))
    if not problems:  # with an entry missing, what the chain provides is not known
        problems = _unmet_requirements(document, settings, chain)
    return chain, problems


def _camera_settings_problems(
    document: YamlDocument, settings: DaemonSettings, chain: list[PluginSpec]
) -> list[Problem]:
    """Each camera's keys that a plugin of the chain owns (`Plugin.camera_settings`: analytics' zones and lines),
    validated by that plugin's model, once per model."""
    problems: list[Problem] = []
    models = {spec.cls.camera_settings for spec in chain if spec.cls.camera_settings is not None}
    for model in sorted(models, key=lambda model: model.__qualname__):
        keys = set(model.model_fields) & set(CameraConfig.model_fields)
        for name, camera in settings.cameras.items():
            values = {key: getattr(camera, key) for key in sorted(keys) if key in camera.model_fields_set}
            try:
                model.model_validate(values, context={"resize": camera.resize})
            except ValidationError as exc:
                problems.extend(problems_of(document, exc, ("cameras", name), model))
    return problems


def _unmet_requirements(
    document: YamlDocument, settings: DaemonSettings, chain: list[PluginSpec]
) -> list[Problem]:
    """Each plugin's `requirements`, camera by camera: over the plugins enabled for a camera, in chain order, what a
    plugin needs must be provided by one before it. A need is pointed at the camera's override that disabled the
    plugin providing it, else at the plugin's entry."""
    problems: list[Problem] = []
    provided = {name: set[str]() for name, camera in settings.cameras.items() if camera.enabled}
    for position, spec in enumerate(chain):
        lacking: dict[str, list[str]] = {}  # need -> cameras for which no plugin before this one provides it
        branch_only: set[tuple[str, int]] = set()  # (need, position of a branch that provides it)
        for name, have in provided.items():
            config = spec.per_camera.get(name)
            if config is None:
                continue
            for need in sorted(spec.cls.requirements(config) - have):
                providers = [index for index in range(position) if need in chain[index].cls.provides]
                off = [index for index in providers if not chain[index].branch]
                if not off:
                    branches = [index for index in providers if chain[index].branch]
                    if branches:
                        if (need, branches[-1]) in branch_only:  # said once, whichever cameras it concerns
                            continue
                        branch_only.add((need, branches[-1]))
                        provider = chain[branches[-1]]
                        problems.append(
                            document.problem(
                                ("plugins", branches[-1], "branch"),
                                f"{spec.id} (plugins.{position}) needs {need}, which {provider.id} "
                                f"(plugins.{branches[-1]}) provides only beside the chain, as a branch: what a branch "
                                "adds to a frame never reaches later plugins (set `branch: false` on it)",
                            )
                        )
                        continue
                    lacking.setdefault(need, []).append(name)
                    continue
                provider = chain[off[-1]]  # provides it, but not for this camera
                problems.append(
                    document.problem(
                        ("cameras", name, "plugins", provider.id, "enabled"),
                        f"{spec.id} (plugins.{position}) needs {need} on camera {name}, which {provider.id} "
                        f"(plugins.{off[-1]}) provides, but not for this camera (enable {provider.id} for it, "
                        f"or disable {spec.id} for it too)",
                    )
                )
        for need, cameras in lacking.items():
            later = [index for index in range(position + 1, len(chain)) if need in chain[index].cls.provides]
            if later:
                hint = f"{chain[later[0]].id} (plugins.{later[0]}) provides it: put it before {spec.id}"
            else:
                hint = f"add {CAPABILITIES.get(need, f'a plugin that provides {need}')} before it"
            where = f"camera {cameras[0]}" if len(cameras) == 1 else f"cameras {', '.join(cameras)}"
            problems.append(
                document.problem(
                    ("plugins", position),
                    f"{spec.id} on {where} needs {need}, which no plugin before it provides ({hint})",
                )
            )
        for name, have in provided.items():
            if name in spec.per_camera and not spec.branch:  # a branch's results never reach later plugins
                have |= spec.cls.provides
    return problems


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
            problems.append(document.problem((*override_path, "enabled"), describe(exc.errors()[0], cls.Config, ())))
            continue
        if not enabled:
            continue
        if not override:
            per_camera[name] = base
            continue
        for fixed in ("type", "id", "branch", "branch_share"):
            if fixed in override:
                problems.append(document.problem((*override_path, fixed), f"`{fixed}` cannot be overridden per camera"))
        try:
            per_camera[name] = cls.Config.model_validate({**raw, **override})
        except ValidationError as exc:
            for problem in problems_of(document, exc, (), cls.Config):
                key = problem.path[0] if problem.path else None
                where = override_path if key in override else path
                problems.append(document.problem((*where, *problem.path), problem.message))
    return per_camera, problems


__all__ = [
    "MAX_FRAME_SIDE",
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
    "ReconnectConfig",
    "RtspConfig",
    "SchedulerConfig",
    "StrictModel",
    "load_config",
    "load_control_settings",
]
