"""The tracks of every camera as one table of parallel arrays, one row per track (see multicamera_tracker.py).

Each column is named once, as a field annotated with its dtype and the shape of one row's value. `take` and
`concat` copy, so a step can change its rows freely and put them back only when it commits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, get_type_hints

import numpy as np

from vigild.frame import Detections

TRACKED, LOST = 0, 1


@dataclass
class EndedTrack:
    track_id: int
    detections: Detections
    """The frame's detections where the track was last seen, and its index there."""
    index: int
    first_ts: float
    last_ts: float
    first_frame: int
    last_frame: int
    frames: int


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
    dets: Annotated[np.ndarray, object]  # that frame's Detections
    first_ts: Annotated[np.ndarray, np.float64]  # when confirmed
    last_ts: Annotated[np.ndarray, np.float64]  # when last seen
    first_index: Annotated[np.ndarray, np.int64]
    last_index: Annotated[np.ndarray, np.int64]
    seen: Annotated[np.ndarray, np.int64]  # frames it was seen on since confirmed
    marked: Annotated[np.ndarray, np.bool_]  # once lost too long (see MultiCameraTracker._advance)

    COLUMNS: ClassVar[tuple[str, ...]]
    LAYOUT: ClassVar[dict[str, tuple[Any, ...]]]

    @classmethod
    def empty(cls, n: int = 0) -> TrackTable:
        return cls(**{name: np.zeros((n, *shape), dtype) for name, (dtype, *shape) in cls.LAYOUT.items()})

    def __len__(self) -> int:
        return len(self.cam)

    def take(self, rows: np.ndarray) -> TrackTable:
        return TrackTable(**{name: getattr(self, name)[rows] for name in self.COLUMNS})

    def ended(self) -> list[EndedTrack]:
        """The confirmed tracks among these rows, as ended tracks."""
        rows = np.flatnonzero(self.uid > 0)
        if not len(rows):
            return []
        columns = (self.uid, self.dets, self.det, self.first_ts, self.last_ts, self.first_index, self.last_index)
        values = (column[rows].tolist() for column in (*columns, self.seen))
        return [EndedTrack(*track) for track in zip(*values, strict=True)]

    def concat(self, other: TrackTable) -> TrackTable:
        return TrackTable(
            **{name: np.concatenate([getattr(self, name), getattr(other, name)]) for name in self.COLUMNS}
        )


TrackTable.COLUMNS = tuple(f.name for f in fields(TrackTable))
_hints = get_type_hints(TrackTable, include_extras=True)
TrackTable.LAYOUT = {name: _hints[name].__metadata__ for name in TrackTable.COLUMNS}  # name: (dtype, *shape)
