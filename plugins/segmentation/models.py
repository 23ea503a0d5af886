"""torchvision semantic segmentation models on vigild's batched device pipeline.

Frames of any sizes are letterboxed into one batch (ImageNet normalisation, as torchvision's weights expect),
the per-pixel class map is taken on the device, and the share of each frame's own area per class is counted for
the whole batch in one `bincount` (the letterbox border is left out). Only the small class maps come back.
`half` runs the network under autocast (float16 on CUDA, bfloat16 on the CPU) with its weights kept in float32:
`.half()` would also cast BatchNorm's running statistics and epsilon to float16, where small variances lose their
digits; autocast casts only the operands of the convolutions and matrix products, and BatchNorm normalises with
its float32 statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchvision.models import get_model, get_model_weights

from vigild.frame import SemanticSegmentation
from vigild.vision.device import OomSplitter, half_dtype
from vigild.vision.letterbox import Letterboxer

ModelName = Literal["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VOC_CLASSES = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""The 21 classes of torchvision's segmentation weights (COCO images with Pascal VOC labels)."""


def load_torchvision(name: ModelName, weights: str | None, num_classes: int) -> torch.nn.Module:
    """`weights`: `DEFAULT` (torchvision's pretrained weights; downloaded where online), a file saved with
    `torch.save(model.state_dict())`, or None (the architecture with random weights, for benchmarks)."""
    if weights == "DEFAULT":
        return get_model(name, weights=get_model_weights(name).DEFAULT)
    model = get_model(name, weights=None, weights_backbone=None, num_classes=num_classes)
    if weights is not None:
        state = torch.load(Path(weights), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state, strict=False)
    return model


class SemanticBackend:
    """A module taking (B, 3, H, W) ImageNet-normalised RGB and returning `{"out": (B, C, H, W) logits}`."""

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: tuple[str, ...],
        input_size: tuple[int, int],
        device: str,
        half: bool,
        name: str = "segmenter",
    ):
        self.device = torch.device(device)
        self.half = half
        self.dtype = half_dtype(self.device) if half else torch.float32
        """What autocast runs the network's convolutions in; the weights stay float32."""
        self.model = model.eval().to(self.device).to(memory_format=torch.channels_last)
        self.class_names = class_names
        self.letterbox = Letterboxer(input_size, self.device, self.dtype, IMAGENET_MEAN, IMAGENET_STD)
        self.oom = OomSplitter(name, device)

    def segment(self, images: list[np.ndarray]) -> list[SemanticSegmentation]:
        return self.oom(self._segment, images)

    @torch.inference_mode()
    def _segment(self, images: Sequence[np.ndarray]) -> list[SemanticSegmentation]:
        batch, geometry = self.letterbox(list(images))
        with torch.autocast(self.device.type, self.dtype, enabled=self.half):
            logits: Any = self.model(batch)
        if isinstance(logits, dict):
            logits = logits["out"]
        class_map = logits.argmax(1)  # (B, H, W)
        count, height, width = class_map.shape
        classes = logits.shape[1]
        inner = geometry.inner  # (B, 4) x0 y0 x1 y1 of each frame inside the input
        cols = torch.arange(width, device=self.device)
        rows = torch.arange(height, device=self.device)
        inside = (
            (cols[None, None, :] >= inner[:, 0, None, None])
            & (cols[None, None, :] < inner[:, 2, None, None])
            & (rows[None, :, None] >= inner[:, 1, None, None])
            & (rows[None, :, None] < inner[:, 3, None, None])
        )
        frame_of = torch.arange(count, device=self.device)[:, None, None].expand_as(class_map)
        bins = (frame_of * classes + class_map)[inside]
        counts = torch.bincount(bins, minlength=count * classes).view(count, classes).float()
        fractions = (counts / counts.sum(1, keepdim=True).clamp(min=1)).cpu().numpy()
        maps = class_map.to(torch.uint8 if classes <= 256 else torch.int64).cpu().numpy()
        boxes = inner.cpu().numpy()
        return [
            SemanticSegmentation(maps[i, y0:y1, x0:x1], fractions[i], self.class_names)
            for i, (x0, y0, x1, y1) in enumerate(boxes.tolist())
        ]
