"""The chain of a config, resolved: each `plugins:` entry's class and config (found by `type`), each camera's
effective config with its overrides applied, and the chain checked camera by camera against what each plugin
requires and provides (`Plugin.requirements`, `Plugin.provides`). Used by vigild.config.loading; each entry comes
out as a `PluginSpec` (vigild.config.plugin_spec)."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from vigild.config.errors import describe, problems_of
from vigild.config.plugin_spec import PluginSpec
from vigild.config.registry import PluginLookupError, load_plugin_class
from vigild.config.settings import CameraConfig, DaemonSettings
from vigild.config.yamlsource import KeyPath, Problem, YamlDocument
from vigild.plugin import CAPABILITIES, Plugin, PluginConfig

_BOOL = TypeAdapter(bool)


def resolve_chain(document: YamlDocument, settings: DaemonSettings) -> tuple[list[PluginSpec], list[Problem]]:
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
        wanted = base.requested_placement
        if wanted is not None and wanted not in cls.placements:
            problems.append(
                document.problem(_placement_key(base, position), _placement_refused(type_name, cls, wanted))
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


def _unmet_requirements(document: YamlDocument, settings: DaemonSettings, chain: list[PluginSpec]) -> list[Problem]:
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
                off = [index for index in providers if not chain[index].beside]
                if not off:
                    branches = [index for index in providers if chain[index].beside]
                    if branches:
                        if (need, branches[-1]) in branch_only:  # said once, whichever cameras it concerns
                            continue
                        branch_only.add((need, branches[-1]))
                        provider = chain[branches[-1]]
                        problems.append(
                            document.problem(
                                _placement_key(provider.config, branches[-1]),
                                f"{spec.id} (plugins.{position}) needs {need}, which {provider.id} "
                                f"(plugins.{branches[-1]}) provides only beside the chain ({provider.placement}): what "
                                "a plugin beside the chain adds to a frame never reaches later plugins (set "
                                "`placement: chain` on it)",
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
            if name in spec.per_camera and not spec.beside:  # results beside the chain never reach later plugins
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
        for fixed in ("type", "id", "placement", "branch", "branch_share"):
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


def _placement_refused(type_name: str, cls: type[Plugin], wanted: str) -> str:
    can = " or ".join(f"`{place}`" for place in cls.placements)
    if cls.placements == ("chain",):
        why = "later plugins need what it adds to each frame, or it keeps state from frame to frame"
        return f"plugin type '{type_name}' cannot run beside the chain ({wanted}): {why}; it runs only in the chain"
    return f"plugin type '{type_name}' cannot run as `{wanted}`: it runs as {can} (default `{cls.placements[0]}`)"


def _placement_key(config: PluginConfig, position: int) -> KeyPath:
    """The key that placed the entry at `position`: its `placement:`, else its `branch:`, else the entry itself (the
    plugin's default)."""
    for key in ("placement", "branch"):
        if getattr(config, key) is not None:
            return ("plugins", position, key)
    return ("plugins", position)
