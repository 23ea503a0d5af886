"""Zones and lines edited in the web console (docs/web.md#editor), kept apart from the config file.

Under systemd the config directory is read-only to the daemon (ProtectSystem=strict), so the console writes its
edits to `edits.yaml` in the state directory: zones and lines only, per camera, by name, a `null` for one the console
removed. At every load (start, reload, `vigild check`) they are merged over the config file's cameras, entry by
entry; a problem in a merged value names the edits file and its line. An entry for a camera the config no longer
has is a warning, not a refusal. To fold the edits back into the config file, copy each camera's `zones:` and
`lines:` from `vigild check --origins` (or the file itself) and delete the edits file.

    cameras:
      plaza:
        zones:
          path: {points: [[0, 0.31], [1, 0.21], [1, 0.73], [0, 0.73]], normalized: true}
        lines:
          crossing: {points: [[0.33, 0.2], [0.33, 1.0]], normalized: true}
          old_line: null          # removed in the console
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vigild.config.yamlsource import KeyPath, Problem, YamlDocument, load_yaml
from vigild.paths import file_mode, state_dir

EDITS_FILE = "edits.yaml"
KINDS = ("zones", "lines")
HEADER = ("# Zones and lines edited in vigild's web console, merged over the config file's cameras at every load\n"
          "# (docs/web.md#editor). `null` removes an entry of the config file. Fold them into the config file and\n"
          "# delete this file to make them part of it.\n")  # fmt: skip


def edits_path(config_file: Path | str | None, environ: Mapping[str, str] | None = None) -> Path:
    return state_dir(config_file, environ) / EDITS_FILE


@dataclass
class Merged:
    """What merging the edits did: where each zone and line came from, and what could not be merged."""

    file: Path | None = None
    origins: dict[tuple[str, str, str], str] = field(default_factory=dict)
    """(camera, kind, name) -> `file:line` of the value in use."""
    warnings: list[str] = field(default_factory=list)


def merge_edits(document: YamlDocument, edits: YamlDocument | None) -> tuple[Merged, list[Problem]]:
    """Merge `edits` (an edits file, loaded) over `document` in place: (what was merged, problems of the edits file
    itself). Each merged value's key path points at its line in the edits file (`document.sources`)."""
    merged = Merged(edits.file if edits is not None else None)
    cameras = document.data.get("cameras") if isinstance(document.data, dict) else None
    if isinstance(cameras, dict):
        for camera, settings in cameras.items():
            for kind in KINDS:
                entries = settings.get(kind) if isinstance(settings, dict) else None
                for name in entries if isinstance(entries, dict) else ():
                    line = document.line_of(("cameras", camera, kind, name))
                    merged.origins[(str(camera), kind, str(name))] = f"{document.file}:{line}"
    if edits is None or edits.data is None:
        return merged, []
    data = edits.data
    if not isinstance(data, dict) or set(data) - {"cameras"} or not isinstance(data.get("cameras", {}), dict):
        return merged, [edits.problem((), "expected `cameras:` holding each camera's `zones:` and `lines:`")]
    problems: list[Problem] = []
    for camera, kinds in (data.get("cameras") or {}).items():
        where = ("cameras", camera)
        if not isinstance(cameras, dict) or camera not in cameras:
            merged.warnings.append(f"{edits.file}:{edits.line_of(where)}: cameras.{camera}: the config has no such "
                                   "camera any more; its edits are ignored")  # fmt: skip
            continue
        if not isinstance(kinds, dict) or set(kinds) - set(KINDS):
            problems.append(edits.problem(where, "expected only `zones:` and `lines:`"))
            continue
        target = cameras[camera]
        if not isinstance(target, dict):
            continue  # the config file's own problem, reported by its validation
        for kind, entries in kinds.items():
            if entries is None:
                continue
            if not isinstance(entries, dict):
                problems.append(edits.problem((*where, kind), "expected a mapping of names"))
                continue
            current = target.get(kind)
            current = dict(current) if isinstance(current, dict) else {}
            for name, value in entries.items():
                path: KeyPath = ("cameras", camera, kind, name)
                if value is None:
                    current.pop(name, None)
                    merged.origins.pop((str(camera), kind, str(name)), None)
                    continue
                current[name] = value
                line = edits.line_of(path)
                merged.origins[(str(camera), kind, str(name))] = f"{edits.file}:{line}"
                for sub, sub_line in edits.lines.items():  # errors inside the value point into the edits file
                    if sub[: len(path)] == path:
                        document.sources[sub] = (edits.file, sub_line)
            target[kind] = current
    return merged, problems


def load_edits(path: Path) -> YamlDocument | None:
    """The edits file, loaded (None if there is none); ConfigError naming it if it is not YAML."""
    if not path.exists():
        return None
    return load_yaml(path)


def edits_text(cameras: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The edits file's text for `cameras` ({camera: {kind: {name: value or None}}}), without empty entries."""
    kept = {c: {k: dict(v) for k, v in kinds.items() if v} for c, kinds in cameras.items()}
    kept = {c: kinds for c, kinds in kept.items() if kinds}
    return HEADER + yaml.safe_dump({"cameras": kept}, sort_keys=True, default_flow_style=None)


def write_edits_text(path: Path, text: str) -> None:
    """Replace the edits file with `text`, atomically (a new file, synced, renamed over), mode 0640 or 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".edits-", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def file_camera(config_file: Path, camera: str) -> dict[str, Any]:
    """The camera's settings as the config file itself has them (before any edit)."""
    data = load_yaml(config_file).data
    cameras = data.get("cameras") if isinstance(data, dict) else None
    found = cameras.get(camera) if isinstance(cameras, dict) else None
    return found if isinstance(found, dict) else {}


def camera_edit(own: Mapping[str, Any], zones: Mapping[str, Any], lines: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A camera's entry in the edits file that makes its zones and lines `zones` and `lines`, given its settings in
    the config file (`own`): what differs, and `None` for each of the file's entries to remove."""
    entry: dict[str, dict[str, Any]] = {}
    for kind, wanted in (("zones", zones), ("lines", lines)):
        value = own.get(kind)
        theirs: dict[str, Any] = value if isinstance(value, dict) else {}
        changes: dict[str, Any] = {name: None for name in theirs if name not in wanted}
        changes.update({name: value for name, value in wanted.items() if theirs.get(name) != value})
        entry[kind] = changes
    return entry


def read_edit_entries(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The edits file's entries as a plain mapping (empty if there is none or it is not what an edits file holds)."""
    document = load_edits(path)
    data = document.data if document is not None else None
    cameras = data.get("cameras") if isinstance(data, dict) else None
    if not isinstance(cameras, dict):
        return {}
    return {str(c): {k: dict(v or {}) for k, v in (kinds or {}).items() if k in KINDS}
            for c, kinds in cameras.items() if isinstance(kinds, dict)}  # fmt: skip
