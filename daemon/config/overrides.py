"""Sections written at the top level (every camera's defaults) and under a camera (overriding them): `recording:`,
`motion:`. One rule for both: what the camera's section sets wins, the rest comes from the top level's."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

SectionT = TypeVar("SectionT", bound=BaseModel)


def overridden(model: type[SectionT], top: SectionT | None, camera: SectionT | None) -> SectionT | None:
    """`camera`'s section over `top`'s (the camera's own keys: those it set), as a `model`; either one alone as it
    is; None when neither is given. `top` may be a subclass of `model` with keys of the top level's only."""
    if camera is None or top is None:
        return camera if camera is not None else top
    merged = {name: getattr(top, name) for name in model.model_fields}
    merged.update({name: getattr(camera, name) for name in camera.model_fields_set})
    return model.model_construct(**merged)  # each value validated in its own section
