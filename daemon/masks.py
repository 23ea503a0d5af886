"""Masks as they travel in events: COCO run-length encoding or polygons, never raw arrays (docs/events.md).

An `InstanceMask` keeps the model's mask of one object as a small crop (model input pixels, inside the object's
box) and encodes it only when an event is made, so a frame's masks cost nothing unless they are published.
RLE is COCO's compressed form from pycocotools, which every COCO tool decodes (`pycocotools.mask.decode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from pycocotools import mask as coco_mask

MaskFormat = Literal["polygon", "rle"]


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of an (H, W) boolean mask: `{"size": [H, W], "counts": "<compressed string>"}`."""
    encoded = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(encoded["size"][0]), int(encoded["size"][1])], "counts": encoded["counts"].decode("ascii")}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """The (H, W) boolean mask of an `rle_encode` result (what a subscriber does with pycocotools)."""
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


@dataclass(frozen=True)
class InstanceMask:
    """One object's mask: `crop` (h, w) bool in model-input pixels whose top-left corner is `origin` there."""

    crop: np.ndarray
    origin: tuple[int, int]
    scale: float
    """Model pixel = frame pixel * scale + pad."""
    pad: tuple[float, float]
    frame_size: tuple[int, int]
    """(width, height) of the frame."""
    format: MaskFormat = "polygon"

    def polygons(self) -> list[list[float]]:
        """Outer contours in frame pixels, each a flat [x1, y1, x2, y2, ...] list (COCO's polygon form)."""
        contours, _ = cv2.findContours(self.crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        shift = np.array(self.origin, np.float32) - np.array(self.pad, np.float32)
        out = []
        for contour in contours:
            if len(contour) < 3:
                continue
            points = (contour.reshape(-1, 2).astype(np.float32) + shift) / self.scale
            out.append(np.round(points, 1).ravel().tolist())
        return out

    def to_frame(self) -> np.ndarray:
        """The full (H, W) boolean mask in frame pixels."""
        width, height = self.frame_size
        full = np.zeros((height, width), bool)
        (x0, y0), (h, w) = self.origin, self.crop.shape
        # the crop's extent in frame pixels, rounded outwards, and the crop resampled to it
        fx0 = max(0, int(np.floor((x0 - self.pad[0]) / self.scale)))
        fy0 = max(0, int(np.floor((y0 - self.pad[1]) / self.scale)))
        fx1 = min(width, int(np.ceil((x0 + w - self.pad[0]) / self.scale)))
        fy1 = min(height, int(np.ceil((y0 + h - self.pad[1]) / self.scale)))
        if fx1 <= fx0 or fy1 <= fy0:
            return full
        # sample the crop at the centre of each frame pixel (vectorised index maps, no resize rounding drift)
        xs = np.clip(((np.arange(fx0, fx1) + 0.5) * self.scale + self.pad[0] - x0).astype(np.int64), 0, w - 1)
        ys = np.clip(((np.arange(fy0, fy1) + 0.5) * self.scale + self.pad[1] - y0).astype(np.int64), 0, h - 1)
        full[fy0:fy1, fx0:fx1] = self.crop[np.ix_(ys, xs)]
        return full

    def to_json(self) -> dict[str, Any]:
        if self.format == "rle":
            return {"format": "rle", "rle": rle_encode(self.to_frame())}
        return {"format": "polygon", "polygons": self.polygons()}
