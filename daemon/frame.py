"""The data that flows through the chain: one `Frame` per captured image, carrying its `Detections`.

`Detections` follows the parallel-arrays design of roboflow/supervision: every per-object attribute is one
numpy array indexed by object, so plugins filter, map and serialise objects without Python loops.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vigild.events import Event

NO_TRACK = -1
"""`tracker_id` of a detection that no tracker has claimed."""

_EMPTY_NAMES: tuple[str, ...] = ()


TRACK_UPDATE_FIELDS = "track_update_fields"
"""The one `Detections.data` key the core reads: an object array, per row a dict of fields that a plugin adds to
that object's `track.update` event (JSON values; None: nothing), merged after `age_s` (vigild.events). The action
recognizer puts its current top `actions` there; any plugin may add its own fields (keys of its own: an envelope
field is dropped as for any event data)."""


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


def _checked_data(data: Mapping[str, object], n: int) -> dict[str, np.ndarray]:
    checked = {}
    for key, value in data.items():
        array = np.asarray(value)
        if array.ndim == 0 or array.shape[0] != n:
            raise ValueError(f"Detections.data[{key!r}]: expected first dimension {n}, got shape {array.shape}")
        checked[key] = array
    return checked


@dataclass(frozen=True)
class Detections:
    """Objects found in one frame, as parallel arrays of length N.

    xyxy: (N, 4) float32 pixel corners in the frame's own coordinates; confidence: (N,) float32;
    class_id: (N,) int32 indices into `class_names`; tracker_id: (N,) int64, `NO_TRACK` when untracked.
    Optional, from segmenting and pose models: masks: (N,) object array of `vigild.vision.masks.InstanceMask`;
    keypoints: (N, K, 3) float32 (x, y, confidence) in frame pixels.
    data: per-object extras that plugins add for later ones (as supervision's `Detections.data`): name -> array
    whose first dimension is N, e.g. the action recognizer's `actions`. Selections keep them; `with_data` adds.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    tracker_id: np.ndarray
    class_names: tuple[str, ...] = _EMPTY_NAMES
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    data: Mapping[str, np.ndarray] = field(default_factory=dict)

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
        object.__setattr__(self, "data", _checked_data(self.data, n))

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

    @classmethod
    def of_rows(
        cls,
        xyxy: np.ndarray,
        confidence: np.ndarray,
        class_id: np.ndarray,
        tracker_id: np.ndarray,
        names: np.ndarray,
        masks: np.ndarray,
        keypoints: np.ndarray,
        data: Mapping[str, np.ndarray] | None = None,
    ) -> Detections:
        """Rows kept apart from their frames (say, each track's last sighting) as one `Detections`. `names`, `masks`
        and `keypoints` are (N,) object arrays: each row's `class_names`, its mask and its (K, 3) keypoints, None
        where it had none. The rows take the first row's class names; keypoints are kept when every row has some of
        one shape."""
        points = None
        if len(keypoints) and all(k is not None and k.shape == keypoints[0].shape for k in keypoints):
            points = np.stack(list(keypoints))
        has_mask = any(m is not None for m in masks)
        return cls(xyxy, confidence, class_id, tracker_id, names[0] if len(names) else _EMPTY_NAMES,
                   masks if has_mask else None, points, data or {})  # fmt: skip

    def with_tracker_ids(self, tracker_id: np.ndarray) -> Detections:
        return self._but(tracker_id=_as_array("tracker_id", tracker_id, np.int64, (len(self),)))

    def with_data(self, **arrays: np.ndarray) -> Detections:
        """These detections with more per-object extras (a new `Detections`; a name already in `data` is replaced)."""
        return self._but(data={**self.data, **_checked_data(arrays, len(self))})

    def _but(self, **checked: object) -> Detections:
        """A copy with these fields, already checked, replaced (without checking the others again: per frame)."""
        copy = object.__new__(Detections)
        copy.__dict__.update(self.__dict__, **checked)
        return copy

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
            {key: value[index] for key, value in self.data.items()},
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


@dataclass(frozen=True)
class TrackLifetimes:
    """Per ended track: `first_ts`, `last_ts` (float64, wall-clock seconds when confirmed and when last seen),
    `first_frame`, `last_frame` (int64 frame indices) and `frames` (int64, frames it was seen on)."""

    first_ts: np.ndarray
    last_ts: np.ndarray
    first_frame: np.ndarray
    last_frame: np.ndarray
    frames: np.ndarray

    def __post_init__(self) -> None:
        lengths = {column.shape for column in vars(self).values()}
        if len(lengths) != 1 or len(next(iter(lengths))) != 1:
            raise ValueError(f"track lifetimes need five 1-D columns of one length, got shapes {sorted(lengths)}")

    def __len__(self) -> int:
        return len(self.first_ts)


@dataclass(frozen=True)
class EndedTracks:
    """Tracks that ended, one row each. `last_seen`: each track's detection where it was last seen, with the
    track's id as `tracker_id`; `lifetime`: when and for how long each was seen, row for row."""

    last_seen: Detections
    reason: str
    """Why they ended: `lost` (not seen for too long), `source_end` (their camera stopped)."""
    lifetime: TrackLifetimes

    def __post_init__(self) -> None:
        if len(self.lifetime) != len(self.last_seen):
            raise ValueError(f"{len(self.last_seen)} ended tracks but {len(self.lifetime)} lifetimes")

    @property
    def track_id(self) -> np.ndarray:
        return self.last_seen.tracker_id

    def __len__(self) -> int:
        return len(self.last_seen)


@dataclass(frozen=True)
class Tracks:
    """What a tracker decided on one frame, for the plugins after it. The `track.new`, `track.update` and
    `track.end` events are made from it once the frame has been through the chain (`vigild.events.add_track_events`).
    Indices are rows of the frame's detections, which later plugins keep (they add extras with `with_data`)."""

    detections: Detections
    """The frame's detections as the tracker gave them ids."""
    new: np.ndarray
    """(int64) Detections whose track was confirmed on this frame, in the order of their ids."""
    updated: np.ndarray
    """(int64) Detections whose track is due a `track.update`."""
    age_s: np.ndarray
    """(float64) Per `updated`: seconds since its track was confirmed."""
    ended: EndedTracks
    """Tracks that ended on this frame (lost)."""
    events_at: int
    """Where the track events go in `frame.events`: as many events were there when the tracker ran."""


@dataclass
class Motion:
    """What the motion gate (vigild.pipeline.gate) decided about a frame of a camera with `motion:` on."""

    fraction: float
    """Share of the frame's unmasked area that moved."""
    boxes: np.ndarray
    """(N, 4) float32 xyxy frame pixels: the areas that moved."""
    regions: np.ndarray | None = None
    """`detect: regions`: (M, 4) float32 xyxy frame pixels where the detector looks (what moved and the tracks it
    follows, padded); None: the whole frame."""
    full_above: float = 1.0
    """`detect: regions`: crops covering more than this share of the frame mean the whole frame instead."""
    crops: int = 0
    """Set by the detector: the crops it ran on (0: the whole frame)."""
    gated: bool = False
    """The frame skipped the chain (nothing moved, no track needed it): its detections are the last detected
    frame's."""


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
    tracks: Tracks | None = None
    """Set by a tracker: which tracks started, are due an update and ended on this frame."""
    motion: Motion | None = None
    """Set by the motion gate on the frames of cameras with `motion:` (docs/motion.md)."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.image.shape[1]), int(self.image.shape[0])
