"""The data that flows through the chain: one `Frame` per captured image, carrying its `Detections`.

`Detections` follows the parallel-arrays design of roboflow/supervision: every per-object attribute is one
numpy array indexed by object, so plugins filter, map and serialise objects without Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vigild.events import Event

NO_TRACK = -1
"""`tracker_id` of a detection that no tracker has claimed."""

_EMPTY_NAMES: tuple[str, ...] = ()


def _as_array(name: str, value: object, dtype: type, shape: tuple[int | None, ...]) -> np.ndarray:
    array: np.ndarray = np.asarray(value, dtype=dtype)
    if array.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape, strict=True)
    ):
        expected = (
            "(" + ", ".join("N" if dim is None else str(dim) for dim in shape) + ("," if len(shape) == 1 else "") + ")"
        )
        raise ValueError(f"Detections.{name}: expected shape {expected}, got {array.shape}")
    return array


@dataclass(frozen=True)
class Detections:
    """Objects found in one frame, as parallel arrays of length N.

    xyxy: (N, 4) float32 pixel corners in the frame's own coordinates; confidence: (N,) float32;
    class_id: (N,) int32 indices into `class_names`; tracker_id: (N,) int64, `NO_TRACK` when untracked.
    Optional, from segmenting and pose models: masks: (N,) object array of `vigild.vision.masks.InstanceMask`;
    keypoints: (N, K, 3) float32 (x, y, confidence) in frame pixels.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    tracker_id: np.ndarray
    class_names: tuple[str, ...] = _EMPTY_NAMES
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None

    def __post_init__(self) -> None:
        xyxy = _as_array("xyxy", self.xyxy, np.float32, (None, 4))
        n = xyxy.shape[0]
        object.__setattr__(self, "xyxy", xyxy)
        object.__setattr__(self, "confidence", _as_array("confidence", self.confidence, np.float32, (n,)))
        object.__setattr__(self, "class_id", _as_array("class_id", self.class_id, np.int32, (n,)))
        object.__setattr__(self, "tracker_id", _as_array("tracker_id", self.tracker_id, np.int64, (n,)))
        if self.masks is not None:
            object.__setattr__(self, "masks", _as_array("masks", self.masks, object, (n,)))
        if self.keypoints is not None:
            object.__setattr__(self, "keypoints", _as_array("keypoints", self.keypoints, np.float32, (n, None, 3)))

    @classmethod
    def empty(cls, class_names: tuple[str, ...] = _EMPTY_NAMES) -> Detections:
        return cls(
            xyxy=np.zeros((0, 4), np.float32),
            confidence=np.zeros(0, np.float32),
            class_id=np.zeros(0, np.int32),
            tracker_id=np.zeros(0, np.int64),
            class_names=class_names,
        )

    @classmethod
    def untracked(
        cls,
        xyxy: np.ndarray,
        confidence: np.ndarray,
        class_id: np.ndarray,
        class_names: tuple[str, ...],
        masks: np.ndarray | None = None,
        keypoints: np.ndarray | None = None,
    ) -> Detections:
        tracker_id = np.full(len(confidence), NO_TRACK, np.int64)
        return cls(xyxy, confidence, class_id, tracker_id, class_names, masks, keypoints)

    def with_tracker_ids(self, tracker_id: np.ndarray) -> Detections:
        return replace(self, tracker_id=tracker_id)

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def __getitem__(self, index: np.ndarray | slice) -> Detections:
        """Select objects by boolean mask, index array or slice (numpy semantics)."""
        return Detections(
            self.xyxy[index],
            self.confidence[index],
            self.class_id[index],
            self.tracker_id[index],
            self.class_names,
            None if self.masks is None else self.masks[index],
            None if self.keypoints is None else self.keypoints[index],
        )

    def label(self, i: int) -> str:
        class_id = int(self.class_id[i])
        return self.class_names[class_id] if 0 <= class_id < len(self.class_names) else str(class_id)


@dataclass(frozen=True)
class SemanticSegmentation:
    """A per-pixel class map of one frame, kept at the model's resolution (the frame's aspect ratio).

    class_map: (h, w) uint8 or int64 class indices into `class_names`; `fractions`: (C,) float32 share of the
    frame's area per class. Scale the map to the frame's size to overlay it.
    """

    class_map: np.ndarray
    fractions: np.ndarray
    class_names: tuple[str, ...]


@dataclass
class Frame:
    """One captured image and everything the chain has learned about it so far."""

    camera: str
    index: int
    """Per-camera frame counter from the capture thread, counting every frame read (dropped ones too)."""
    ts_wall: float
    """Wall-clock capture time, seconds since the epoch (UTC)."""
    ts_mono: float
    """`time.monotonic()` at capture; use for durations and latency."""
    image: np.ndarray
    """BGR uint8, H x W x 3."""
    pts_ms: float | None = None
    """Position of the frame in its stream, where the source reports one."""
    detections: Detections = field(default_factory=Detections.empty)
    segmentation: SemanticSegmentation | None = None
    events: list[Event] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])
