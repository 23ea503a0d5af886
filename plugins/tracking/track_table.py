"""The tracks of every camera as one table of parallel arrays, one row per track (see multicamera_tracker.py).

Each column is named once, as a field annotated with its dtype and the shape of one row's value. `take` and
`concat` copy, so a step can change its rows freely and put them back only when it commits. A track keeps of its
last sighting only its own row (box, confidence, class, mask, keypoints), never the frame's detections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, get_type_hints

import numpy as np

from vigild.frame import Detections, TrackLifetimes

TRACKED, LOST = 0, 1


@dataclass
class Sightings:
    """The detections of a step's frames, flat: what a track keeps of the one it is seen as."""

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    names: np.ndarray
    """Per frame: its `class_names` (object)."""
    pos: np.ndarray
    """Per detection: its frame."""
    masks: np.ndarray | None
    """Per detection: its mask or None (object); None when no frame has masks."""
    keypoints: np.ndarray | None
    """Per detection: its (K, 3) keypoints or None (object); None when no frame has keypoints."""

    @classmethod
    def of(cls, frames: Sequence[Detections], xyxy: np.ndarray, confidence: np.ndarray, pos: np.ndarray) -> Sightings:
        """`xyxy`, `confidence`: the frames' own, already concatenated; `pos`: each detection's frame."""
        names = np.fromiter((d.class_names for d in frames), object, len(frames))
        class_id = np.concatenate([d.class_id for d in frames]) if frames else np.zeros(0, np.int32)
        masks = keypoints = None
        if any(d.masks is not None for d in frames):
            masks = np.concatenate([_or_none(d.masks, len(d)) for d in frames])
        if any(d.keypoints is not None for d in frames):  # each row a view of its frame's (N, K, 3) keypoints
            keypoints = np.concatenate([_or_none(d.keypoints, len(d)) for d in frames])
        return cls(xyxy, confidence, class_id, names, pos, masks, keypoints)


def _or_none(values: np.ndarray | None, n: int) -> np.ndarray:
    return np.full(n, None, object) if values is None else np.fromiter(values, object, n)


@dataclass(eq=False)
class TrackTable:
    cam: Annotated[np.ndarray, np.int64]  # its camera's slot
    state: Annotated[np.ndarray, np.int8]  # TRACKED or LOST
    activated: Annotated[np.ndarray, np.bool_]  # matched a second time (or started on its tracker's first frame)
    order: Annotated[np.ndarray, np.int64]  # position in its camera's tracked or lost list
    frame_id: Annotated[np.ndarray, np.int64]  # its camera's frame count when last matched
    start_frame: Annotated[np.ndarray, np.int64]
    mean: Annotated[np.ndarray, np.float64, 8]  # the Kalman filter's state
    cov: Annotated[np.ndarray, np.float64, 8, 8]
    uid: Annotated[np.ndarray, np.int64]  # its id, 0 until confirmed
    det: Annotated[np.ndarray, np.int64]  # index of its detection in the frame last seen
    xyxy: Annotated[np.ndarray, np.float32, 4]  # that detection's box, confidence, class...
    confidence: Annotated[np.ndarray, np.float32]
    class_id: Annotated[np.ndarray, np.int32]
    names: Annotated[np.ndarray, object]  # ...its frame's class names, its mask and keypoints (or None)
    mask: Annotated[np.ndarray, object]
    keypoints: Annotated[np.ndarray, object]
    first_ts: Annotated[np.ndarray, np.float64]  # when confirmed
    last_ts: Annotated[np.ndarray, np.float64]  # when last seen
    first_index: Annotated[np.ndarray, np.int64]
    last_index: Annotated[np.ndarray, np.int64]
    seen: Annotated[np.ndarray, np.int64]  # frames it was seen on since confirmed
    marked: Annotated[np.ndarray, np.bool_]  # once lost too long (see MultiCameraTracker._advance)

    COLUMNS: ClassVar[tuple[str, ...]]
    LAYOUT: ClassVar[dict[str, tuple[Any, ...]]]
    WIDE: ClassVar[frozenset[str]]
    """Columns of more than one value per row: `ndarray.take` copies their rows faster than fancy indexing."""

    @classmethod
    def empty(cls, n: int = 0) -> TrackTable:
        return cls(**{name: np.empty((n, *shape), dtype) if dtype is object else np.zeros((n, *shape), dtype)
                      for name, (dtype, *shape) in cls.LAYOUT.items()})  # fmt: skip

    def __len__(self) -> int:
        return len(self.cam)

    def take(self, rows: np.ndarray) -> TrackTable:
        """These rows (an index array), copied."""
        wide = self.WIDE
        return TrackTable(**{name: column.take(rows, axis=0) if name in wide else column[rows]
                             for name, column in vars(self).items()})  # fmt: skip

    def saw(self, rows: np.ndarray, seen: Sightings, at: np.ndarray) -> None:
        """`rows` were seen as the detections `at` of `seen`: that is their last sighting now."""
        self.xyxy[rows], self.confidence[rows] = seen.xyxy[at], seen.confidence[at]
        self.class_id[rows], self.names[rows] = seen.class_id[at], seen.names[seen.pos[at]]
        self.mask[rows] = None if seen.masks is None else seen.masks[at]
        self.keypoints[rows] = None if seen.keypoints is None else seen.keypoints[at]

    def ended(self) -> Detections:
        """The confirmed tracks among these rows, as ended tracks: each one's last sighting with its id and, in
        `data`, its lifetime (see `vigild.frame.EndedTracks`)."""
        rows = np.flatnonzero(self.uid > 0)
        lifetime = {"first_ts": self.first_ts[rows], "last_ts": self.last_ts[rows], "frames": self.seen[rows],
                    "first_frame": self.first_index[rows], "last_frame": self.last_index[rows]}  # fmt: skip
        return Detections.of_rows(self.xyxy[rows], self.confidence[rows], self.class_id[rows], self.uid[rows],
                                  self.names[rows], self.mask[rows], self.keypoints[rows], lifetime)  # fmt: skip

    @staticmethod
    def lifetimes(ended: Detections) -> TrackLifetimes:
        """The lifetimes `ended()` put in its detections' `data`, typed, as `vigild.frame.EndedTracks` carries them."""
        data = ended.data
        return TrackLifetimes(data["first_ts"], data["last_ts"], data["first_frame"], data["last_frame"], data["frames"])

    def concat(self, other: TrackTable) -> TrackTable:
        theirs = vars(other)
        return TrackTable(**{name: np.concatenate([column, theirs[name]]) for name, column in vars(self).items()})


TrackTable.COLUMNS = tuple(f.name for f in fields(TrackTable))
_hints = get_type_hints(TrackTable, include_extras=True)
TrackTable.LAYOUT = {name: _hints[name].__metadata__ for name in TrackTable.COLUMNS}  # name: (dtype, *shape)
TrackTable.WIDE = frozenset(name for name, (_, *shape) in TrackTable.LAYOUT.items() if shape)
