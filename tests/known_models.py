"""Models with known weights, made for the tests: what they output is fixed by the input, so the tests can say
exactly where a box, mask or keypoint must land in the frame.

Each reads the letterboxed batch the way a real model does (B, 3, H, W, RGB 0-1) and answers in the format of
ultralytics' heads in export mode, so it runs through the same `YoloBackend` as a YOLO model. The rule:
pixels brighter than 0.75 (a white rectangle; the letterbox grey is 0.45) are the object.
"""

from __future__ import annotations

import torch
from torch import nn

BRIGHT = 0.75
MASK_COEFFICIENTS = 32


class RectangleYolo(nn.Module):
    """One anchor per image: the bright pixels' bounding box, class 0 (score 0.9) when there are any.

    task `detect`, `segment` (prototype 0 is the bright area at 1/4 resolution, coefficient 1 on it) or `pose`
    (4 keypoints: the box's corners, clockwise from top-left).
    """

    def __init__(self, task: str = "detect", num_classes: int = 2):
        super().__init__()
        self.task = task
        self.num_classes = num_classes
        self.stride = torch.tensor([32.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = x.shape
        bright = x.float().mean(1) > BRIGHT  # (B, H, W)
        cols, rows = bright.any(1), bright.any(2)
        found = cols.any(1)
        x1 = cols.float().argmax(1)
        x2 = width - cols.flip(1).float().argmax(1)
        y1 = rows.float().argmax(1)
        y2 = height - rows.flip(1).float().argmax(1)
        box = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1).float()  # centre, size
        scores = torch.zeros(batch, self.num_classes, device=x.device)
        scores[:, 0] = found.float() * 0.9
        parts = [box, scores]
        if self.task == "segment":
            coefficients = torch.zeros(batch, MASK_COEFFICIENTS, device=x.device)
            coefficients[:, 0] = 1.0
            parts.append(coefficients)
        if self.task == "pose":
            corners = torch.stack([x1, y1, x2, y1, x2, y2, x1, y2], 1).float().view(batch, 4, 2)
            visible = torch.ones(batch, 4, 1, device=x.device)
            parts.append(torch.cat([corners, visible], 2).view(batch, 12))
        preds = torch.cat(parts, 1)[:, :, None]  # (B, channels, 1 anchor), float32 like vigild's YOLO decoding
        if self.task != "segment":
            return preds
        small = nn.functional.avg_pool2d(bright[:, None].float(), 4)  # (B, 1, H/4, W/4), 0-1 coverage
        prototypes = torch.zeros(batch, MASK_COEFFICIENTS, height // 4, width // 4, device=x.device)
        prototypes[:, 0] = (small[:, 0] - 0.5) * 20  # logit: > 0 where most of the 4x4 cell is bright
        return preds, prototypes.to(x.dtype)  # prototypes stay in the network's precision, as in YOLO


class BrightClassSegmenter(nn.Module):
    """Semantic segmentation with two classes, `0` elsewhere and `1` on bright pixels, torchvision's output form.

    Its input is ImageNet-normalised, where white is about 2.2, dark grey -1.6 and the letterbox border -0.2.
    """

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bright = (x.float().mean(1, keepdim=True) - 1.0) * 10
        return {"out": torch.cat([-bright, bright], 1).to(x.dtype)}
