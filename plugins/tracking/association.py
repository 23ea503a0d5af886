"""ByteTrack's association of one camera's tracks with its detections, its dedup of tracked against lost tracks,
and the array helpers that let plugins/tracking/multicamera_tracker.py compute them for every camera at once.

The stages, thresholds, order of tracks in each stage and float32 cost matrices are ultralytics' (`BYTETracker`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lap
import numpy as np

from vigild.plugins.tracking.track_table import LOST, TRACKED, TrackTable

UNCONFIRMED = 2  # a sort group besides TRACKED and LOST: tracked but not yet matched a second time
DUPLICATE_IOU_DISTANCE = 0.15
SECOND_STAGE_THRESH = 0.5
UNCONFIRMED_THRESH = 0.7


@dataclass(frozen=True)
class AssociationSettings:
    high_thresh: float
    low_thresh: float
    new_track_thresh: float
    match_thresh: float
    max_frames_lost: int
    fuse_score: bool = True


@dataclass
class Matches:
    """An association: indices of the tracks (rows) and of the detections."""

    rows: np.ndarray
    dets: np.ndarray
    """The tracks matched and their detections, pair by pair, stage by stage."""
    lost: np.ndarray
    """Tracked tracks left without a detection."""
    removed: np.ndarray
    """Unconfirmed tracks left without a detection."""
    new: np.ndarray
    """Detections that start a track."""


def associate(
    cost: np.ndarray,
    fused: np.ndarray,
    groups: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    conf: np.ndarray,
    s: AssociationSettings,
) -> Matches:
    """One camera: `cost` and `fused` (IoU cost, and IoU cost with the confidence fused in if `s.fuse_score`) are
    (tracks, detections), its tracks sorted as `groups` (TRACKED, LOST, UNCONFIRMED), each group in list order;
    `high` and `low` mark the detections of the first and of the second stage."""
    n_tracked = int(np.count_nonzero(groups == TRACKED))
    n_pool = n_tracked + int(np.count_nonzero(groups == LOST))
    hi, lo = np.flatnonzero(high), np.flatnonzero(low)
    rows, dets = [], []
    # 1: tracked and lost tracks against confident detections.
    x, y = assign(fused[:n_pool][:, hi], s.match_thresh)
    hit = x >= 0
    rows.append(np.flatnonzero(hit))
    dets.append(hi[x[hit]])
    unmatched = np.flatnonzero(~hit)
    remaining = hi[y < 0]
    # 2: tracked tracks left over against the less confident detections; unmatched ones are lost.
    still_tracked = unmatched[unmatched < n_tracked]
    x, _ = assign(cost[still_tracked][:, lo], SECOND_STAGE_THRESH)
    hit = x >= 0
    rows.append(still_tracked[hit])
    dets.append(lo[x[hit]])
    lost = still_tracked[~hit]
    # 3: tracks seen once against the confident detections left; unmatched ones are dropped.
    unconfirmed = np.arange(n_pool, len(groups))
    removed = unconfirmed
    if len(unconfirmed):
        x, y = assign(fused[unconfirmed][:, remaining], UNCONFIRMED_THRESH)
        hit = x >= 0
        rows.append(unconfirmed[hit])
        dets.append(remaining[x[hit]])
        removed = unconfirmed[~hit]
        remaining = remaining[y < 0]
    # 4: new tracks from what is left.
    new = remaining[conf[remaining] >= s.new_track_thresh]
    return Matches(np.concatenate(rows), np.concatenate(dets), lost, removed, new)


def drop_duplicates(
    tracks: TrackTable, pos: np.ndarray, count: int, box_of: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Keep-mask: a tracked and a lost track of one camera (`pos`) whose boxes (`box_of` their Kalman means) overlap
    with IoU over 0.85 are one object; the shorter-lived one goes."""
    keep = np.ones(len(tracks), bool)
    tracked, lost = np.flatnonzero(tracks.state == TRACKED), np.flatnonzero(tracks.state == LOST)
    if not len(tracked) or not len(lost):
        return keep
    boxes = box_of(tracks.mean).astype(np.float32)
    tracked = tracked[np.lexsort((tracks.order[tracked], pos[tracked]))]
    lost = lost[np.lexsort((tracks.order[lost], pos[lost]))]
    t_rank, t_count = ranks(pos[tracked], count)
    l_rank, l_count = ranks(pos[lost], count)
    iou = pairwise_iou(
        padded(boxes[tracked], pos[tracked], t_rank, count, int(t_count.max())),
        padded(boxes[lost], pos[lost], l_rank, count, int(l_count.max())),
    )
    p, i, j = np.nonzero(1 - iou < DUPLICATE_IOU_DISTANCE)
    valid = (i < t_count[p]) & (j < l_count[p])
    p, i, j = p[valid], i[valid], j[valid]
    if not len(p):
        return keep
    a = tracked[np.concatenate([[0], np.cumsum(t_count)[:-1]])[p] + i]
    b = lost[np.concatenate([[0], np.cumsum(l_count)[:-1]])[p] + j]
    a_age = tracks.frame_id[a] - tracks.start_frame[a]
    b_age = tracks.frame_id[b] - tracks.start_frame[b]
    keep[b[a_age > b_age]] = False
    keep[a[a_age <= b_age]] = False
    return keep


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(..., T, 4) x (..., D, 4) float32 xyxy -> (..., T, D) float32 IoU, computed as ultralytics' `bbox_ioa`."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    inter = (np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])).clip(0) * (
        np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    ).clip(0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    result: np.ndarray = inter / (area_b + area_a - inter + 1e-7)
    return result


def assign(cost: np.ndarray, thresh: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost matching with lap.lapjv, pairs above `thresh` left out: (column per row, row per column), -1
    where unmatched."""
    rows, cols = cost.shape
    if rows == 0 or cols == 0:
        return np.full(rows, -1, np.int64), np.full(cols, -1, np.int64)
    _, x, y = lap.lapjv(cost, extend_cost=True, cost_limit=thresh)
    return np.asarray(x, np.int64), np.asarray(y, np.int64)


def padded(values: np.ndarray, group: np.ndarray, rank: np.ndarray, groups: int, width: int) -> np.ndarray:
    """Rows of `values` laid out as (groups, width, ...) by their group and rank in it, zeros elsewhere."""
    out = np.zeros((groups, width, *values.shape[1:]), values.dtype)
    out[group, rank] = values
    return out


def ranks(group: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by group: each row's rank within its group, and the groups' sizes."""
    counts = np.bincount(group, minlength=groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.arange(len(group)) - starts[group], counts
