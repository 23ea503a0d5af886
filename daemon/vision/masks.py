"""Masks as they travel in events: COCO run-length encoding or polygons, never raw arrays (docs/events.md).

An `InstanceMask` keeps the model's mask of one object as a small low-resolution crop around the object's box and
upsamples and encodes it only when an event is made, so a frame's masks cost little unless they are published.
RLE is COCO's compressed form from pycocotools, which every COCO tool decodes (`pycocotools.mask.decode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from pycocotools import mask as coco_mask

MaskFormat = Literal["polygon", "rle"]
THRESHOLD = 127
"""Mask probability above which a pixel belongs to the object (0.5 on the 0-255 scale)."""


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of an (H, W) boolean mask: `{"size": [H, W], "counts": "<compressed string>"}`."""
    encoded = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(encoded["size"][0]), int(encoded["size"][1])], "counts": encoded["counts"].decode("ascii")}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """The (H, W) boolean mask of an `rle_encode` result (what a subscriber does with pycocotools)."""
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


@dataclass(frozen=True)
class InstanceMask:
    """One object's mask as the model made it: `probabilities` (h, w) uint8 (0-255) at a low resolution
    (`stride` model-input pixels per cell), covering the object's box, whose top-left cell is `origin`.

    `probabilities` is the object's own array, not a view into a batch's masks: a tracker or analytics keeps the
    mask of an object's last sighting, and a view would keep the whole batch's masks alive with it."""

    probabilities: np.ndarray
    origin: tuple[int, int]
    """(x, y) of the first cell, in cells."""
    stride: float
    box: tuple[float, float, float, float]
    """The object's box in model-input pixels: the mask is cut to it."""
    scale: tuple[float, float]
    """Model pixel = frame pixel * scale + pad, per axis (x, y)."""
    pad: tuple[float, float]
    frame_size: tuple[int, int]
    """(width, height) of the frame."""
    format: MaskFormat = "polygon"

    def model_crop(self) -> tuple[np.ndarray, tuple[int, int]]:
        """(bool mask in model-input pixels, its top-left corner there): upsampled bilinearly, cut to the box."""
        h, w = self.probabilities.shape
        up_w, up_h = round(w * self.stride), round(h * self.stride)
        full = cv2.resize(self.probabilities, (up_w, up_h), interpolation=cv2.INTER_LINEAR) > THRESHOLD
        ox, oy = round(self.origin[0] * self.stride), round(self.origin[1] * self.stride)
        x1, y1, x2, y2 = self.box
        # keep the pixels whose centres lie inside the box
        bx0, by0 = max(0, int(np.ceil(x1 - 0.5)) - ox), max(0, int(np.ceil(y1 - 0.5)) - oy)
        bx1, by1 = min(up_w, int(np.ceil(x2 - 0.5)) - ox), min(up_h, int(np.ceil(y2 - 0.5)) - oy)
        if bx1 <= bx0 or by1 <= by0:
            return np.zeros((1, 1), bool), (ox, oy)
        return full[by0:by1, bx0:bx1], (ox + bx0, oy + by0)

    def polygons(self) -> list[list[float]]:
        """Outer contours in frame pixels, each a flat [x1, y1, x2, y2, ...] list (COCO's polygon form)."""
        crop, origin = self.model_crop()
        contours, _ = cv2.findContours(crop.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        shift = np.array(origin, np.float32) - np.array(self.pad, np.float32)
        limit = np.array(self.frame_size, np.float32)
        scale = np.array(self.scale, np.float32)
        out = []
        for contour in contours:
            if len(contour) < 3:
                continue
            points = np.clip((contour.reshape(-1, 2).astype(np.float32) + shift) / scale, 0, limit)
            out.append(np.round(points, 1).ravel().tolist())
        return out

    def to_frame(self) -> np.ndarray:
        """The full (H, W) boolean mask in frame pixels."""
        crop, (x0, y0) = self.model_crop()
        width, height = self.frame_size
        full = np.zeros((height, width), bool)
        h, w = crop.shape
        # the crop's extent in frame pixels, rounded outwards, sampled at the centre of each frame pixel
        sx, sy = self.scale
        fx0 = max(0, int(np.floor((x0 - self.pad[0]) / sx)))
        fy0 = max(0, int(np.floor((y0 - self.pad[1]) / sy)))
        fx1 = min(width, int(np.ceil((x0 + w - self.pad[0]) / sx)))
        fy1 = min(height, int(np.ceil((y0 + h - self.pad[1]) / sy)))
        if fx1 <= fx0 or fy1 <= fy0:
            return full
        xs = np.floor((np.arange(fx0, fx1) + 0.5) * sx + self.pad[0] - x0).astype(np.int64)
        ys = np.floor((np.arange(fy0, fy1) + 0.5) * sy + self.pad[1] - y0).astype(np.int64)
        inside_x, inside_y = (xs >= 0) & (xs < w), (ys >= 0) & (ys < h)
        block = crop[np.ix_(np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1))]
        full[fy0:fy1, fx0:fx1] = block & inside_y[:, None] & inside_x[None, :]
        return full

    def to_json(self) -> dict[str, Any]:
        if self.format == "rle":
            return {"format": "rle", "rle": rle_encode(self.to_frame())}
        return {"format": "polygon", "polygons": self.polygons()}
