"""The action recognizer's settings (`type: action_recognizer`, docs/config.md), beside its implementation
(action_recognizer.py)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from vigild.plugin import PluginConfig, check_torchvision_weights


class ActionRecognizerConfig(PluginConfig):
    admin_only: ClassVar[frozenset[str]] = frozenset({"labels", "model", "weights"})  # TorchScript, state-dict files
    type: Literal["action_recognizer"] = "action_recognizer"
    model: str = Field(
        "r3d_18",
        description="A torchvision video classifier (r3d_18, mc3_18, r2plus1d_18, s3d, mvit_v1_b, mvit_v2_s, "
        "swin3d_t) or a TorchScript file of your own.",
    )
    weights: str | None = Field(
        "DEFAULT",
        description="For torchvision models: `DEFAULT` (Kinetics-400, downloaded where online), a state-dict file "
        "(e.g. fine-tuned, with its `labels`), or null (random weights: benchmarks only).",
    )
    labels: Path | None = Field(None, description="Labels file, one per line, in the model's output order.")
    mode: Literal["tracks", "frame"] = Field("tracks", description="`frame`: classify each camera's whole view.")
    classes: list[str] = Field(["person"], min_length=1, description="Detection labels whose tracks get tubes.")
    clip_len: int | None = Field(None, ge=1, description="Frames per clip; default the model's own.")
    size: int | None = Field(None, ge=8, description="Crop side in pixels; default the model's own.")
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    stride: int = Field(1, ge=1, description="Sample every n-th frame of a camera into the tubes.")
    interval: int = Field(8, ge=1, description="Classify a full tube every n new crops.")
    margin: float = Field(0.15, ge=0, le=2, description="Context around the box, as a share of its longer side.")
    actions: list[str] = Field([], description="Labels that raise events; empty: every label.")
    threshold: float = Field(0.5, gt=0, le=1, description="Smoothed score at which an action starts.")
    thresholds: dict[str, float] = Field({}, description="Per-label thresholds, overriding `threshold`.")
    hysteresis: float = Field(0.1, ge=0, lt=1, description="An action ends below its threshold minus this.")
    min_clips: int = Field(2, ge=1, description="Consecutive clips at or above the threshold before action.start.")
    smoothing: float = Field(
        0.5, gt=0, le=1, description="Weight of the newest clip's scores in the running average; 1 = no smoothing."
    )
    top_k: int = Field(3, ge=0, description="Actions added to each track.update event (0: none).")
    max_tracks: int = Field(512, ge=1, description="Tubes kept at once; further tracks wait for a free one.")
    max_batch: int = Field(64, ge=1, description="Clips per forward pass.")
    backlog: int | None = Field(
        None,
        ge=1,
        description="Beside the chain: clips waiting for the model at most; beyond, the oldest are skipped (counted). "
        "Default `max_batch`.",
    )
    half: bool | None = Field(
        None,
        description="Reduced precision through autocast (weights stay float32): float16 on CUDA (the default "
        "there), bfloat16 on the CPU.",
    )

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: str | None) -> str | None:
        return check_torchvision_weights(value)

    @field_validator("labels")
    @classmethod
    def _labels_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"labels file not found: {value}")
        return value
