"""Config errors as people read them: pydantic's validation errors turned into `file:line: key.path: what was
expected`, with the allowed keys for an unknown one, long values shortened, and secrets never shown."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from vigild.config.sources import redact
from vigild.config.yamlsource import KeyPath, Problem, YamlDocument

_SECRET_KEYS = frozenset({"password", "username"})
"""Keys whose value a config error never shows, not even when it is of the wrong type."""


def problems_of(document: YamlDocument, exc: ValidationError, prefix: KeyPath, model: type[BaseModel]) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(
            part
            for part in error["loc"]
            if not (isinstance(part, str) and (part.startswith("function-") or part == "[key]"))
        )
        tags = _tag_positions(model, loc)
        path = (*prefix, *(part for i, part in enumerate(loc) if i not in tags))  # `outputs.0.url`, not `.0.mqtt.url`
        problem = document.problem(path, describe(error, model, loc))
        shown = tuple(_shorten(part) if isinstance(part, str) else part for part in path)  # a 70,000-character name
        problems.append(Problem(shown, problem.message, problem.line, problem.file))
    return problems


def _shorten(text: str, most: int = 80) -> str:
    return text if len(text) <= most else f"{text[: most - 20]}... ({len(text)} characters)"


def describe(error: Mapping[str, Any], model: type[BaseModel], loc: tuple[Any, ...]) -> str:
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


def _tagged(annotation: Any) -> dict[str, type[BaseModel]]:
    """The models of a discriminated union (`Annotated[A | B, Field(discriminator="type")]`, perhaps in a list or a
    dict) by their tag; empty for anything else."""
    for meta in getattr(annotation, "__metadata__", ()):
        name = getattr(meta, "discriminator", None)
        if isinstance(name, str):
            found = {}
            for member in getattr(annotation.__origin__, "__args__", ()):
                if isinstance(member, type) and issubclass(member, BaseModel) and name in member.model_fields:
                    for tag in getattr(member.model_fields[name].annotation, "__args__", ()):
                        found[tag] = member
            return found
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _tagged(arg)
        if found:
            return found
    return {}


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, set[int]]:
    """The model at `loc` inside `model` (or None), and the positions in `loc` that are a discriminated union's tag
    (pydantic puts the chosen member's tag in the error's location)."""
    current: Any = model
    tags: dict[str, type[BaseModel]] = {}
    positions = set()
    for i, part in enumerate(loc):
        if isinstance(part, str) and part in tags:
            current, tags = tags[part], {}
            positions.add(i)
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None, positions
        if isinstance(part, str) and part in current.model_fields:
            annotation = current.model_fields[part].annotation
            tags = _tagged(annotation)
            current = _model_in(annotation)
        # else a dict key or list index: the container's item model was already chosen
    return current, positions


def _tag_positions(model: type[BaseModel], loc: tuple[Any, ...]) -> set[int]:
    return _walk(model, loc)[1]


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model found at `loc` inside `model`, for 'unknown key' hints (best effort)."""
    current, _ = _walk(model, loc)
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
