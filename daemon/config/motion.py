"""The `motion:` section (docs/motion.md): cheap motion detection on every frame, and the detector only where and
when something moved. Top level for the defaults of every camera, under a camera to override them; off unless
given (`motion: {}` turns it on with the defaults below).

Only values here: the detection of motion is vigild.vision.motion, the gate that decides which frames the chain
runs on is vigild.pipeline.gate, and the detector's crops are the detector plugin's (`detect: regions`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vigild.config.overrides import overridden

Coordinate = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class MotionMask(_Strict):
    """A polygon where motion never counts (a tree in the wind, a clock, a road outside the property)."""

    points: list[tuple[Coordinate, Coordinate]] = Field(
        min_length=3, max_length=256, description="The polygon's corners, in order: pixels of the frame the chain "
        "sees (after `resize`), or fractions of its width and height with `normalized: true`."
    )
    normalized: bool = Field(False, description="Points are fractions (0-1) of the frame's width and height.")

    @model_validator(mode="after")
    def _fractions(self) -> MotionMask:
        if self.normalized and any(x > 1 or y > 1 for x, y in self.points):
            raise ValueError("normalized: true, but a point lies outside 0-1 (outside the frame)")
        return self

    def outside(self, width: int, height: int) -> bool:
        """Whether a corner lies outside a `width`x`height` frame (the mask was drawn for another size)."""
        if self.normalized:
            return False
        return any(x > width or y > height for x, y in self.points)


class MotionConfig(_Strict):
    """A camera's `motion:` (the top level's keys, overridden by what the camera's own section sets)."""

    enabled: bool = Field(True, description="false: this camera is detected on every frame, whatever the top says.")
    threshold: int = Field(
        25, ge=1, le=255, description="How much a pixel of the small grey copy must differ from the background "
        "(0-255) to count as moving."
    )
    min_area: float = Field(
        64, ge=0, le=1_000_000, description="Smallest moving area that counts, in pixels of the frame (a 8x8 "
        "square by default): smaller blobs are noise."
    )
    max_contours: int = Field(
        32, ge=1, le=1024, description="The most moving areas kept on a frame (the largest); the rest are merged "
        "into the kept ones' bounding box."
    )
    masks: list[MotionMask] = Field(default_factory=list, max_length=64, description="Polygons that never count.")
    width: int = Field(
        160, ge=32, le=1920, description="Width of the small grey copy motion is found on (its height keeps the "
        "frame's aspect ratio)."
    )
    alpha: float = Field(
        0.2, gt=0, le=1, description="How fast the background follows the frames (a running average): a car "
        "that parks becomes background after about 1/alpha frames."
    )
    global_change: float = Field(
        0.6, gt=0, le=1, description="A frame on which more than this share of the picture changed at once (lights "
        "switched, the camera shook) is not motion: the background is taken anew from it."
    )
    detect: Literal["full", "regions"] = Field(
        "full", description="`full`: frames with motion are detected whole (letterboxed to the model's input). "
        "`regions`: only crops around what moved, at the model's input size (finds small, distant objects the "
        "downscaled whole frame loses); a frame whose crops would cover most of it is detected whole."
    )
    padding: float = Field(
        16, ge=0, le=1024, description="Pixels added around each moving area (and each moving track's box) "
        "before crops are made."
    )
    full_above: float = Field(
        0.6, gt=0, le=1, description="`detect: regions`: when the crops would cover more than this share of the "
        "frame, the whole frame is detected instead."
    )
    stationary_after_s: float = Field(
        3.0, gt=0, le=3600, description="A track whose box has not moved (IoU ≥ 0.8 with where it was) for this "
        "long stands still: it no longer keeps the detector running."
    )
    stationary_interval_s: float = Field(
        10.0, gt=0, le=3600, description="Tracks that stand still are detected again this often, with nothing "
        "moving, to keep them alive (frames between are gated)."
    )


def effective_motion(top: MotionConfig | None, camera: MotionConfig | None) -> MotionConfig | None:
    """The motion settings of one camera: the top-level defaults, overridden by what the camera's section sets;
    None when the camera's frames are all detected (no section, or `enabled: false`)."""
    result = overridden(MotionConfig, top, camera)
    if result is None or not result.enabled:
        return None
    return result


def mask_warnings(config: MotionConfig, width: int, height: int) -> list[str]:
    """What is wrong with the masks on a `width`x`height` frame: each mask with a corner outside it (drawn for
    another size: the part outside never counts, and the part inside may not be what was meant)."""
    return [
        f"motion mask {i} has a corner outside the {width}x{height} frame (drawn for another size?)"
        for i, mask in enumerate(config.masks)
        if mask.outside(width, height)
    ]
