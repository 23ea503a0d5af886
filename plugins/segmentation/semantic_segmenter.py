"""Semantic segmentation plugin (torchvision DeepLabV3, LR-ASPP, FCN): what share of each frame each class covers.

Every processed frame gets a `segmentation` event with the area fraction of each class present (above
`min_fraction`), and, with `mask: rle`, the class map itself as one COCO RLE per class at the frame's size.
The class map also stays on the frame (`Frame.segmentation`) for later plugins.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import BeforeValidator, Field, field_validator

from vigild.events import Event
from vigild.frame import Frame, SemanticSegmentation
from vigild.plugin import FrameErrors, Plugin, PluginConfig, check_torchvision_weights
from vigild.plugins.segmentation.models import VOC_CLASSES, ModelName, SemanticBackend, load_torchvision
from vigild.vision.device import default_half
from vigild.vision.letterbox import sort_frames
from vigild.vision.masks import rle_encode

Side = Annotated[int, Field(gt=0, le=8192, multiple_of=8)]


def _square(value: object) -> object:
    return (value, value) if isinstance(value, int | str) else value


class SemanticSegmenterConfig(PluginConfig):
    admin_only: ClassVar[frozenset[str]] = frozenset({"model", "weights"})  # what it loads (a state-dict file)
    type: Literal["semantic_segmenter"] = "semantic_segmenter"
    model: ModelName = "lraspp_mobilenet_v3_large"
    weights: str | None = Field(
        "DEFAULT",
        description="`DEFAULT`: torchvision's pretrained weights (downloaded where online, cached by torch); a "
        "state_dict file; or null: the architecture with random weights (benchmarks only).",
    )
    class_names: list[str] | None = Field(
        None, description="One name per output class; default the 21 Pascal VOC classes of torchvision's weights."
    )
    input_size: Annotated[tuple[Side, Side], BeforeValidator(_square)] = Field(
        (520, 520), description="Network input, one side or [width, height]; frames are letterboxed into it."
    )
    half: bool | None = Field(
        None,
        description="Reduced precision under autocast, weights and BatchNorm statistics kept in float32: fp16 on CUDA "
        "(default on there), bf16 on the CPU (default off; fast on CPUs with AVX512-BF16 or AMX).",
    )
    min_fraction: float = Field(0.001, ge=0, le=1, description="Classes covering less of the frame are left out.")
    mask: Literal["none", "rle"] = Field("none", description="`rle`: add the class map as COCO RLE per class.")

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, value: str | None) -> str | None:
        return check_torchvision_weights(value)


class SemanticSegmenter(Plugin[SemanticSegmenterConfig]):
    Config = SemanticSegmenterConfig
    repeatable = True  # stateless per frame: after a failed batch the chain reruns it frame by frame
    provides = frozenset({"segmentation"})
    # a slow model beside the chain by default, on the newest frame of each camera: detection never waits for it
    # beside the chain by default, in a process of its own: a model of many small layers holds the interpreter
    # between its operators, so on a thread it takes it from the chain (measured: docs/performance.md, 1.09x of
    # detection alone in a process against 0.90x on a thread). `placement: chain` puts it in the chain, on every
    # frame, for a later plugin that reads frame.segmentation.
    placements = ("process", "thread", "chain")

    def start(self) -> None:
        config = self.config
        names = tuple(config.class_names) if config.class_names else VOC_CLASSES
        module = load_torchvision(config.model, config.weights, len(names))
        half = config.half if config.half is not None else default_half(self.context.device)
        self.backend = SemanticBackend(module, names, config.input_size, self.context.device, half, config.model)
        self.log.info("%s on %s for %s", config.model, self.context.device, ", ".join(self.context.cameras))

    def process(self, frames: list[Frame]) -> None:
        positions, rejected = sort_frames([frame.image for frame in frames])
        good = [frames[position] for position in positions]
        if good:
            results = self.backend.segment([f.image for f in good])
            for frame, result in zip(good, results, strict=True):
                frame.segmentation = result
            for position, frame, result in zip(positions, good, results, strict=True):  # a failure costs one frame
                try:
                    event = self._event(frame, result)
                except Exception as exc:
                    rejected[position] = exc
                    continue
                frame.events.append(event)
        if rejected:
            raise FrameErrors(rejected)

    def _event(self, frame: Frame, result: SemanticSegmentation) -> Event:
        present = np.flatnonzero(result.fractions >= max(self.config.min_fraction, 1e-9))
        data: dict[str, Any] = {
            "model": self.config.model,
            "fractions": {result.class_names[i]: round(float(result.fractions[i]), 4) for i in present},
        }
        if self.config.mask == "rle":
            width, height = frame.size
            full = cv2.resize(result.class_map, (width, height), interpolation=cv2.INTER_NEAREST)
            data["mask"] = {
                "format": "rle",
                "classes": {result.class_names[i]: rle_encode(full == i) for i in present},
            }
        return Event("segmentation", frame.camera, frame.ts_wall, frame.index, data=data)
