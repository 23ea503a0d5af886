"""The daemon's configuration: `load_config` reads one YAML file and validates it whole, resolving each plugin
section with the plugin's own `Config` model (found by `type`); `with_camera` applies a control client's camera.

Every problem is reported as `file:line: key.path: what was expected`, all of them at once, so a user fixes a
config in one round. The chain is resolved and checked in vigild.config.resolve (each entry a `PluginSpec`, of
vigild.config.plugin_spec), the typed settings live in vigild.config.settings, the wording of errors in
vigild.config.errors; all are re-exported here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from vigild.config.backends import BackendUnavailable, camera_backend
from vigild.config.edits import Merged, edits_path, load_edits, merge_edits
from vigild.config.errors import problems_of
from vigild.config.plugin_spec import PluginSpec
from vigild.config.resolve import resolve_chain
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
from vigild.config.sources import SourceKind, SourceSpec, parse_source
from vigild.config.yamlsource import ConfigError, KeyPath, Problem, YamlDocument, expand_env, load_yaml
from vigild.plugin import PLUGIN_ID_PATTERN


class ControlRefused(ConfigError):
    """A control client's camera names what only the config file may: a local file, or a file a plugin loads.

    The control socket answers it with the code `forbidden` (its `forbidden` attribute)."""

    forbidden = True


@dataclass(frozen=True)
class Config:
    file: Path
    settings: DaemonSettings
    chain: tuple[PluginSpec, ...]
    document: YamlDocument
    """The parsed file, kept to point at lines when a plugin finds a problem only at start."""
    file_instances: int | None = None
    """Plugin instances of the config file as loaded, before control clients changed cameras (`with_camera` carries
    it over); None: this config is the file's own."""
    edits: Merged = dataclasses.field(default_factory=Merged)
    """The web console's edits merged in: where each zone and line came from, warnings (vigild.config.edits)."""

    @functools.cached_property
    def instances(self) -> int:
        """Distinct plugin instances the chain makes: one per plugin and distinct effective config (as
        vigild.pipeline.chain groups the cameras)."""
        return sum(len({config.model_dump_json() for config in spec.per_camera.values()}) for spec in self.chain)

    @property
    def instance_limit(self) -> int:
        """The most plugin instances control clients' changes may bring it to: the file's own plus
        `control.max_instances`."""
        own = self.instances if self.file_instances is None else self.file_instances
        return own + self.settings.control.max_instances

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


def load_config(file: str | Path, environ: Mapping[str, str] | None = None, edits: bool = True,
                edits_text: str | None = None) -> Config:  # fmt: skip
    """Read, expand and validate a config file, with the web console's edits (vigild.config.edits) merged over its
    cameras unless `edits` is False (`edits_text`: the edits file's text as it would be); raises `ConfigError`
    listing every problem found."""
    document = load_yaml(file)
    problems = expand_env(document, environ)
    if problems:
        raise ConfigError(document.file, problems)
    path = edits_path(document.file, environ)
    if edits_text is not None:
        edits_document: YamlDocument | None = load_yaml(path, text=edits_text)
    else:
        edits_document = load_edits(path) if edits else None
    merged, problems = merge_edits(document, edits_document)
    if problems:
        raise ConfigError(document.file, problems)
    return dataclasses.replace(validate_document(document), edits=merged)


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
    removed (None), validated whole, with the camera's capture back end available here. Raises `ConfigError` (one
    naming `control.max_instances` where the change would make more plugin instances than it allows), or
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
    changed = validate_document(YamlDocument(config.file, data, config.document.lines, config.document.sources))
    own = config.instances if config.file_instances is None else config.file_instances
    changed = dataclasses.replace(changed, file_instances=own, edits=config.edits)
    if camera is not None and changed.instances > max(config.instances, changed.instance_limit):
        limit = config.settings.control.max_instances
        raise ConfigError(
            config.file,
            [
                Problem(
                    ("cameras", name, "plugins"),
                    f"this change would make {changed.instances} plugin instances, each with its own model, past "
                    f"the limit of {changed.instance_limit} (the config file's {own} + control.max_instances: "
                    f"{limit}); cameras with the same plugin settings share one instance: give this camera settings "
                    "another camera has, or raise control.max_instances in the config file",
                )
            ],
        )
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
    chain, problems = resolve_chain(document, settings)
    if problems:
        raise ConfigError(document.file, problems)
    return Config(document.file, settings, tuple(chain), document)


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
