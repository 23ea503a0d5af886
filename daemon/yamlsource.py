"""Reading a YAML config so that every later error can point at a file, a line and a key path.

PyYAML's composer keeps each node's position; we build the plain data from the same node tree and remember
the line of every key, then expand `${VAR}` / `${VAR:-default}` in string values from the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    path: KeyPath
    message: str
    line: int | None = None

    def dotted(self) -> str:
        return ".".join(str(part) for part in self.path) or "(top level)"


class ConfigError(Exception):
    """A config that cannot be used; `str()` gives one line per problem: `file:line: key.path: what was expected`."""

    def __init__(self, file: str | Path, problems: Sequence[Problem]):
        self.file = str(file)
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = []
        for problem in self.problems:
            where = f"{self.file}:{problem.line}" if problem.line is not None else self.file
            lines.append(f"{where}: {problem.dotted()}: {problem.message}")
        return "\n".join(lines)


@dataclass
class YamlDocument:
    file: Path
    data: Any
    lines: dict[KeyPath, int]

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the deepest key on `path` that the file spells out (1-based)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def problem(self, path: KeyPath, message: str) -> Problem:
        return Problem(tuple(path), message, self.line_of(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def load_yaml(file: str | Path, text: str | None = None) -> YamlDocument:
    path = Path(file)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(path, [Problem((), f"cannot read config file: {exc.strerror or exc}")]) from None
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[KeyPath, int] = {}
        if node is not None:
            _index_lines(node, (), lines)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, [Problem((), f"malformed YAML: {reason}", line)]) from None
    finally:
        loader.dispose()
    return YamlDocument(path, data, lines)


def _index_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen and key_node.tag != "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
            lines[(*path, key)] = key_node.start_mark.line + 1
            _index_lines(value_node, (*path, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*path, i), lines)


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(document: YamlDocument, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """Expand `${VAR}` and `${VAR:-default}` in every string value, in place; `$$` is a literal `$`.

    As in the shell, `:-` also applies when the variable is set but empty. Returns one problem per unset variable.
    """
    env = os.environ if environ is None else environ
    problems: list[Problem] = []

    def expand(value: str, path: KeyPath) -> str:
        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            current = env.get(name)
            if current:
                return current
            if default is not None:
                return default
            if current is None:
                problems.append(
                    document.problem(
                        path, f"environment variable {name} is not set (write ${{{name}:-default}} for a default)"
                    )
                )
            return ""

        return _VAR.sub(substitute, value)

    def walk(value: Any, path: KeyPath) -> Any:
        if isinstance(value, str):
            return expand(value, path)
        if isinstance(value, dict):
            return {key: walk(item, (*path, str(key))) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item, (*path, i)) for i, item in enumerate(value)]
        return value

    document.data = walk(document.data, ())
    return problems
