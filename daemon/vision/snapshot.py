"""Snapshots: a JPEG of the object (a crop around its box) or of the whole frame with the box drawn.

They travel as a third message part after the JSON, never inside it, so subscribers that do not want images
skip a part instead of parsing base64. Made only for the events that ask for them (off by default), scaled down
to `max_side` and re-encoded smaller when over `max_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

SnapshotKind = Literal["crop", "frame"]
CROP_MARGIN = 0.2
"""Context around the box in a crop, as a fraction of the box's size on each side."""


@dataclass(frozen=True)
class Snapshot:
    jpeg: bytes
    kind: SnapshotKind
    width: int
    height: int

    def describe(self) -> dict[str, object]:
        """What the event's JSON says about the third part."""
        return {"format": "jpeg", "kind": self.kind, "width": self.width, "height": self.height, "bytes": len(self.jpeg)}


def make_snapshot(
    image: np.ndarray,
    bbox: list[float],
    kind: SnapshotKind,
    max_side: int = 640,
    quality: int = 80,
    max_bytes: int = 200_000,
) -> Snapshot | None:
    """The snapshot of `bbox` in `image` (BGR), or None when it cannot be made small enough."""
    import cv2  # here, not at the top: the events module imports this one, and `vigild ctl` must not load OpenCV

    height, width = image.shape[:2]
    x1, y1, x2, y2 = bbox
    if kind == "crop":
        mx, my = (x2 - x1) * CROP_MARGIN, (y2 - y1) * CROP_MARGIN
        left, top = max(0, int(x1 - mx)), max(0, int(y1 - my))
        right, bottom = min(width, int(np.ceil(x2 + mx))), min(height, int(np.ceil(y2 + my)))
        if right <= left or bottom <= top:
            return None
        picture = image[top:bottom, left:right]
    else:
        picture = image
    scale = min(1.0, max_side / max(picture.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
        picture = cv2.resize(picture, size, interpolation=cv2.INTER_AREA)
    elif kind == "frame":
        picture = picture.copy()  # the box is drawn on it: never on the frame the chain shares
    if kind == "frame":
        corners = np.round(np.array(bbox) * scale).astype(int)
        cv2.rectangle(picture, tuple(corners[:2]), tuple(corners[2:]), (0, 0, 255), 2)  # drawn after scaling
    for attempt_quality in (quality, max(30, quality - 30), 30):
        ok, encoded = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, attempt_quality])
        if ok and encoded.nbytes <= max_bytes:
            return Snapshot(encoded.tobytes(), kind, picture.shape[1], picture.shape[0])
    return None
