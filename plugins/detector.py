"""Object detector plugin: one model serves every camera of its group, a batch of frames per call.

Two back ends behind one interface: `ultralytics` (YOLOv8/YOLO11 `.pt`, `.onnx`, `.engine`, or a model name) and
`darknet` (`.cfg` + `.weights` through OpenCV DNN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BeforeValidator, Field, FilePath, ValidationInfo, field_validator

from vigild.frame import Frame
from vigild.plugin import Plugin, PluginConfig, PluginConfigError
from vigild.plugins.backends.base import DetectorBackend

Size = Annotated[int, Field(gt=0, multiple_of=32)]


def _square(value: object) -> object:
    return (value, value) if isinstance(value, int | str) else value


class DetectorConfig(PluginConfig):
    type: Literal["detector"] = "detector"
    backend: Literal["ultralytics", "darknet"] = "ultralytics"
    cfg: FilePath | None = Field(None, validate_default=True, description="darknet: the network's .cfg file.")
    names: FilePath | None = Field(None, description="darknet: class names, one a line (e.g. coco.names).")
    weights: str = Field(description="A weights file; for ultralytics also a model name such as yolov8n.pt.")
    classes: list[str | int] | None = Field(None, description="Keep only these classes (names or ids); default all.")
    confidence: float = Field(0.25, ge=0, le=1)
    nms_iou: float = Field(0.45, ge=0, le=1)
    input_size: Annotated[tuple[Size, Size], BeforeValidator(_square)] | None = Field(
        None, description="Network input: one side or [width, height]; default the model's own (darknet cfg, 640)."
    )
    half: bool | None = Field(None, description="fp16 inference; default on for CUDA devices.")

    @field_validator("cfg")
    @classmethod
    def _cfg_for_darknet(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None and info.data.get("backend") == "darknet":
            raise ValueError("required when backend is darknet (the network's .cfg file)")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: str, info: ValidationInfo) -> str:
        path = Path(value)
        if path.is_file():
            return value
        if info.data.get("backend") == "darknet" or "/" in value or path.exists():
            raise ValueError(f"weights file not found: {value}")
        return value  # a bare model name: ultralytics resolves it (downloads it where online)


class Detector(Plugin[DetectorConfig]):
    Config = DetectorConfig

    def start(self) -> None:
        config = self.config
        backend: DetectorBackend
        if config.backend == "darknet":
            from vigild.plugins.backends.darknet import DarknetBackend

            assert config.cfg is not None  # the config validator guarantees it
            backend = DarknetBackend(
                config.cfg,
                Path(config.weights),
                config.names,
                config.input_size,
                config.confidence,
                config.nms_iou,
                self.context.device,
            )
        else:
            from vigild.plugins.backends.yolo import UltralyticsBackend

            half = config.half if config.half is not None else self.context.device.startswith("cuda")
            backend = UltralyticsBackend(
                config.weights, config.input_size, config.confidence, config.nms_iou, self.context.device, half
            )
        if config.classes is not None:
            backend.class_filter = self._class_ids(config.classes, backend.class_names)
        self.backend = backend
        self.log.info(
            "%s detector %s on %s for %s",
            config.backend,
            config.weights,
            self.context.device,
            ", ".join(self.context.cameras),
        )

    @staticmethod
    def _class_ids(classes: list[str | int], names: tuple[str, ...]) -> np.ndarray:
        ids = []
        for wanted in classes:
            if isinstance(wanted, int):
                if not 0 <= wanted < len(names):
                    raise PluginConfigError(
                        "classes", f"class id {wanted} is out of range (the model has {len(names)} classes)"
                    )
                ids.append(wanted)
            elif wanted in names:
                ids.append(names.index(wanted))
            else:
                sample = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
                raise PluginConfigError("classes", f"the model has no class '{wanted}' (it has: {sample})")
        return np.array(sorted(set(ids)), np.int64)

    def process(self, frames: list[Frame]) -> None:
        for frame, detections in zip(frames, self.backend.detect([frame.image for frame in frames]), strict=True):
            frame.detections = detections
