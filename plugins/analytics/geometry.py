"""Zones (polygons) and directed lines of a camera, from the config, and the vectorised tests on them.

Users write `zones:` and `lines:` under each camera; the analytics plugin owns what they mean: its
`camera_settings` model (`CameraGeometry`) is what config loading validates them with, with the file and line.

Coordinates are pixels of the frame the chain sees (after `resize`), or fractions of its width and height with
`normalized: true`. A line's direction: walking along it from its first point to its second as drawn on the
image (y pointing down), `in` is a crossing from the left-hand side to the right-hand side, `out` the reverse.
Example: a line from [0, 300] to [800, 300] counts an object moving down the image as `in`.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from vigild.config.settings import ShapeName

Point = tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)]]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    normalized: bool = Field(False, description="Points are fractions (0-1) of the frame's width and height.")

    def _check_normalized(self, points: list[Point]) -> None:
        if self.normalized and any(x > 1 or y > 1 for x, y in points):
            raise ValueError("normalized: true, but a point lies outside 0-1 (outside the frame)")

    def pixels(self, points: list[Point], width: int, height: int) -> np.ndarray:
        array = np.asarray(points, np.float64)
        return array * (width, height) if self.normalized else array


def _segments_cross(p1: np.ndarray, p2: np.ndarray, q1: np.ndarray, q2: np.ndarray) -> bool:
    """Whether segments p1-p2 and q1-q2 properly intersect (touching at an end does not count)."""

    def side(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
        return float((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

    d1, d2 = side(q1, q2, p1), side(q1, q2, p2)
    d3, d4 = side(p1, p2, q1), side(p1, p2, q2)
    return d1 * d2 < 0 and d3 * d4 < 0


class ZoneConfig(_Shape):
    points: list[Point] = Field(min_length=3, description="The polygon's corners, in order.")

    @model_validator(mode="after")
    def _simple_polygon(self) -> ZoneConfig:
        self._check_normalized(self.points)
        corners = np.asarray(self.points, np.float64)
        n = len(corners)
        for i in range(n):  # config time, a handful of edges: the plain O(n²) check is fine
            for j in range(i + 1, n):
                if j == i + 1 or (i == 0 and j == n - 1):
                    continue  # neighbouring edges share a corner
                if _segments_cross(corners[i], corners[(i + 1) % n], corners[j], corners[(j + 1) % n]):
                    raise ValueError(
                        f"the zone's edges {i}-{i + 1} and {j}-{(j + 1) % n} cross: the polygon intersects itself"
                    )
        x, y = corners[:, 0], corners[:, 1]
        if np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) == 0:
            raise ValueError("the zone's points enclose no area (all on one line)")
        return self


class LineConfig(_Shape):
    points: tuple[Point, Point] = Field(description="From and to: [[x1, y1], [x2, y2]]; the order sets `in`.")

    @model_validator(mode="after")
    def _has_length(self) -> LineConfig:
        self._check_normalized(list(self.points))
        (x1, y1), (x2, y2) = self.points
        if x1 == x2 and y1 == y2:
            raise ValueError("the line's two points are the same: it has no length")
        return self


def inside_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """(N,) bool: which of (N, 2) points lie inside the (E, 2) polygon (even-odd rule, all edges at once)."""
    if len(points) == 0:
        return np.zeros(0, bool)
    x, y = points[:, 0:1], points[:, 1:2]  # (N, 1) against (E,) edges
    x1, y1 = polygon[:, 0], polygon[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    straddles = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing_x = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    return np.count_nonzero(straddles & (x < crossing_x), axis=1) % 2 == 1


def side_of_line(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(N,) sign of each point relative to the directed line: +1 right-hand side (`in`), -1 left, 0 on it."""
    direction = end - start
    offset = points - start
    return np.sign(direction[0] * offset[:, 1] - direction[1] * offset[:, 0])


def crosses_segment(a: np.ndarray, b: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """(N,) bool: whether each movement a[i] → b[i] passes through the line segment start-end."""
    if len(a) == 0:
        return np.zeros(0, bool)
    side_a, side_b = side_of_line(a, start, end), side_of_line(b, start, end)
    direction = b - a
    seg = np.stack([start, end])
    # where the segment's ends lie relative to each movement
    e0 = np.sign(direction[:, 0] * (seg[0, 1] - a[:, 1]) - direction[:, 1] * (seg[0, 0] - a[:, 0]))
    e1 = np.sign(direction[:, 0] * (seg[1, 1] - a[:, 1]) - direction[:, 1] * (seg[1, 0] - a[:, 0]))
    return (side_a * side_b < 0) & (e0 * e1 <= 0)


class CameraGeometry(BaseModel):
    """A camera's `zones:` and `lines:`, validated when the config is loaded (the camera's `resize`, if any, comes as
    the validation context: pixel points must then lie on the frame)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    zones: dict[ShapeName, ZoneConfig] = Field(default_factory=dict, description="Named polygons (docs/analytics.md).")
    lines: dict[ShapeName, LineConfig] = Field(
        default_factory=dict, description="Named directed lines (docs/analytics.md)."
    )

    @model_validator(mode="after")
    def _on_the_frame(self, info: ValidationInfo) -> CameraGeometry:
        context: dict[str, Any] = info.context or {}
        resize = context.get("resize")
        if resize is None:
            return self
        width, height = resize  # the frame's size is known: pixel points must lie on it
        shapes: dict[str, dict[str, ZoneConfig] | dict[str, LineConfig]] = {"zones": self.zones, "lines": self.lines}
        for kind, named in shapes.items():
            for name, shape in named.items():
                points = shape.points
                if not shape.normalized and any(x > width or y > height for x, y in points):
                    raise ValueError(f"{kind}.{name}: a point lies outside the {width}x{height} frame set by resize")
        return self

    @classmethod
    def of_camera(cls, camera: Any) -> CameraGeometry:
        """The geometry of a camera's settings (validated already when its config was loaded)."""
        return cls.model_validate({"zones": camera.zones, "lines": camera.lines}, context={"resize": camera.resize})
