"""Reading a YAML config so that every later error can point at a file, a line and a key path.

PyYAML's composer keeps each node's position; we build the plain data from the same node tree and remember
the line of every key, then expand `${VAR}` / `${VAR:-default}` in string values from the environment.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    path: KeyPath
    message: str
    line: int | None = None
    file: str | None = None
    """Another file than the config's (the web console's edits, merged over it)."""

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
            file = problem.file or self.file
            where = f"{file}:{problem.line}" if problem.line is not None else file
            lines.append(f"{where}: {problem.dotted()}: {problem.message}")
        return "\n".join(lines)


@dataclass
class YamlDocument:
    file: Path
    data: Any
    lines: dict[KeyPath, int]
    sources: dict[KeyPath, tuple[Path, int]] = field(default_factory=dict)
    """Keys merged in from another file (vigild.config.edits): that file and the line there."""

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the deepest key on `path` that the file spells out (1-based)."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    def problem(self, path: KeyPath, message: str) -> Problem:
        for end in range(len(path), -1, -1):
            key = tuple(path[:end])
            if key in self.sources:
                file, line = self.sources[key]
                return Problem(tuple(path), message, line, str(file))
            if key in self.lines:
                return Problem(tuple(path), message, self.lines[key])
        return Problem(tuple(path), message, None)


MAX_FILE_BYTES = 4 * 1024 * 1024
"""A config is a few kilobytes; a bigger file is a mistake (or an attack), refused before it is read."""
MAX_DEPTH = 64
"""Collections nested deeper than this (also through aliases) are refused: every later walk over the data recurses."""
MAX_ALIASED_NODES = 100_000
"""Keys and values that aliases (`*x`, `<<: *x`) expand to, in all: bounds a "billion laughs" alias bomb, which grows
tenfold a level, while leaving room for defaults merged into hundreds of cameras."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that bounds what a document can make the later walks over its data do: nesting deeper than
    `MAX_DEPTH` (the composer and every walk recurse per level), aliases expanding to more than `MAX_ALIASED_NODES`
    values, an alias to a collection from inside itself. Each is refused at the line of the alias or collection.
    A scalar it cannot construct (a 5,000-digit int, month 13) is a YAML error at its line, not a ValueError."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._open_anchors: list[str | None] = []
        """Anchors of the collections being composed, one entry per level (None where there is no anchor)."""
        self._size: dict[int, int] = {}
        self._height: dict[int, int] = {}
        """Per composed node (by id; all stay alive in the tree): values and levels once aliases are expanded."""
        self._aliased = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise self._refuse(f"alias *{event.anchor} refers to a collection that contains it", event)
            node = super().compose_node(parent, index)
            self._aliased += self._size[id(node)]
            if self._aliased > MAX_ALIASED_NODES:
                raise self._refuse(f"aliases expand to more than {MAX_ALIASED_NODES} values", event)
            if len(self._open_anchors) + self._height[id(node)] > MAX_DEPTH:
                raise self._refuse(f"nested more than {MAX_DEPTH} levels deep (through alias *{event.anchor})", event)
            return node
        if len(self._open_anchors) >= MAX_DEPTH:
            raise self._refuse(f"nested more than {MAX_DEPTH} levels deep", event)
        self._open_anchors.append(event.anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open_anchors.pop()
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        self._size[id(node)] = 1 + sum(self._size[id(child)] for child in children)
        self._height[id(node)] = 1 + max((self._height[id(child)] for child in children), default=0)
        return node

    @staticmethod
    def _refuse(problem: str, event: yaml.Event) -> yaml.composer.ComposerError:
        mark: Any = event.start_mark  # (the stubs allow libyaml's Mark here, which the pure-Python parser never makes)
        return yaml.composer.ComposerError(None, None, problem, mark)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this {node.tag.rpartition(':')[2]} value: {str(exc).partition(';')[0]}", node.start_mark
            ) from None


def _read_config_bytes(path: Path) -> bytes:
    """The file's bytes, or ConfigError; never blocks on a FIFO or device and never reads more than the cap."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(path, [Problem((), f"cannot read config file: {exc.strerror or exc}")]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
            raise ConfigError(path, [Problem((), f"cannot read config file: {kind}, expected a regular file")])
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, [Problem((), f"cannot read config file: {exc.strerror or exc}")]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(path, [Problem((), f"config file larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")])
    return data


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - line_start + 1
        message = f"not UTF-8: byte 0x{data[exc.start]:02x} at column {column}; save the file as UTF-8"
        raise ConfigError(path, [Problem((), message, line)]) from None


def load_yaml(file: str | Path, text: str | None = None) -> YamlDocument:
    """Parse a config file (or `text`, said to come from `file`) into data and the line of every key.

    A hostile or broken file is a ConfigError naming the line where it can: not a regular file, over
    `MAX_FILE_BYTES`, not UTF-8, nested deeper than `MAX_DEPTH`, more than `MAX_ALIASED_NODES` through aliases."""
    path = Path(file)
    if text is None:
        text = _decode(path, _read_config_bytes(path))
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # (checks every character: a ReaderError)
        node = loader.get_single_node()
        lines: dict[KeyPath, int] = {}
        if node is not None:
            _index_lines(node, (), lines)  # recursive: the loader bounded the depth
        data = loader.construct_document(node) if node is not None else None
    except yaml.reader.ReaderError as exc:
        what = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        problem = Problem((), f"malformed YAML: character {what}: {exc.reason}", text.count("\n", 0, exc.position) + 1)
        raise ConfigError(path, [problem]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, [Problem((), f"malformed YAML: {reason}", line)]) from None
    finally:
        if loader is not None:
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
