"""ByteTrack's association for every camera of a batch at once.

Why not ultralytics' BYTETracker, one per camera: it keeps a Python object per track and per detection and runs
the Kalman update track by track, which costs about 1 ms per frame at 30 objects, a ceiling of a few hundred
cameras' frames per second for a whole process. This module holds the tracks of all cameras as one table of
arrays and runs, per batch, one Kalman predict, one float32 IoU computation (padded camera by camera) and one Kalman
update for all of them. Only the assignment itself, `lap.lapjv`, runs per camera (it solves one matrix per call).

The algorithm is ultralytics' ByteTrack step for step (the same stages, thresholds, order of tracks in each stage,
float32 cost matrices and dedup of tracked against lost tracks), and BoT-SORT's motion model and camera-motion
compensation with `form="xywh"`; tests/test_multicamera_tracker.py checks frame by frame that it gives the tracks
ultralytics gives. Ids are numbered per camera from 1 when a track is first confirmed, never reused on a camera.

Every step first computes, then commits: a step that raises leaves the tracker as it was (its tracks, cameras, id
and list-order counters, and the camera-motion compensator's previous frame).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lap
import numpy as np

from vigild.frame import NO_TRACK, Detections
from vigild.plugins.backends.box_kalman import BoxForm, BoxKalman

log = logging.getLogger("vigild.plugins.tracker")

TRACKED, LOST = 0, 1
_UNCONFIRMED = 2  # a sort group: tracked but not yet matched a second time
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
class CameraFrame:
    camera: str
    detections: Detections
    ts: float
    index: int
    image: np.ndarray | None = None
    """Only read for camera-motion compensation."""


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


@dataclass
class FrameTracks:
    tracker_id: np.ndarray
    """(N,) per detection of the frame: its track's id, or NO_TRACK."""
    new: np.ndarray
    """Indices of detections whose track was confirmed on this frame."""
    due: np.ndarray
    """Indices of detections whose track is due an update (`update_interval` since its last)."""
    age_s: np.ndarray
    """Per `due`: seconds since the track was confirmed."""
    ended: list[EndedTrack]


@dataclass
class _Pending:
    """What a step changes besides the tracks, held aside until it commits."""

    slots: dict[str, int]
    frames: np.ndarray
    next_uid: np.ndarray
    order: int
    gmc: dict[int, Any] = field(default_factory=dict)

    def next_orders(self, n: int) -> np.ndarray:
        orders = np.arange(self.order, self.order + n)
        self.order += n
        return orders


class _Table:
    """One row per track of every camera: parallel arrays."""

    COLUMNS: ClassVar[dict[str, tuple[Any, tuple[int, ...]]]] = {
        "cam": (np.int64, ()),
        "state": (np.int8, ()),
        "activated": (np.bool_, ()),
        "order": (np.int64, ()),  # position in its camera's tracked or lost list
        "frame_id": (np.int64, ()),  # the tracker's frame count when last matched
        "start_frame": (np.int64, ()),
        "mean": (np.float64, (8,)),
        "cov": (np.float64, (8, 8)),
        "uid": (np.int64, ()),  # 0 until confirmed
        "det": (np.int64, ()),  # index of its detection in the frame last seen
        "dets": (object, ()),  # that frame's Detections
        "first_ts": (np.float64, ()),
        "last_ts": (np.float64, ()),
        "last_event_ts": (np.float64, ()),
        "first_index": (np.int64, ()),
        "last_index": (np.int64, ()),
        "seen": (np.int64, ()),
        "marked": (np.bool_, ()),  # once lost too long (see _commit)
    }

    def __init__(self, n: int = 0):
        for name, (dtype, shape) in self.COLUMNS.items():
            setattr(self, name, np.zeros((n, *shape), dtype))
        self.cam: np.ndarray
        self.state: np.ndarray
        self.activated: np.ndarray
        self.order: np.ndarray
        self.frame_id: np.ndarray
        self.start_frame: np.ndarray
        self.mean: np.ndarray
        self.cov: np.ndarray
        self.uid: np.ndarray
        self.det: np.ndarray
        self.dets: np.ndarray
        self.first_ts: np.ndarray
        self.last_ts: np.ndarray
        self.last_event_ts: np.ndarray
        self.first_index: np.ndarray
        self.last_index: np.ndarray
        self.seen: np.ndarray
        self.marked: np.ndarray

    def __len__(self) -> int:
        return len(self.cam)

    def take(self, rows: np.ndarray) -> _Table:
        out = _Table.__new__(_Table)
        for name in self.COLUMNS:
            setattr(out, name, getattr(self, name)[rows])
        return out

    def put(self, rows: np.ndarray, values: _Table) -> None:
        for name in self.COLUMNS:
            getattr(self, name)[rows] = getattr(values, name)

    def extend(self, other: _Table) -> None:
        for name in self.COLUMNS:
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))


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


def _padded(values: np.ndarray, group: np.ndarray, rank: np.ndarray, groups: int, width: int) -> np.ndarray:
    """Rows of `values` laid out as (groups, width, ...) by their group and rank in it, zeros elsewhere."""
    out = np.zeros((groups, width, *values.shape[1:]), values.dtype)
    out[group, rank] = values
    return out


def _ranks(group: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by group: each row's rank within its group, and the groups' sizes."""
    counts = np.bincount(group, minlength=groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.arange(len(group)) - starts[group], counts


class MultiCameraTracker:
    def __init__(
        self,
        settings: AssociationSettings,
        form: BoxForm = "xyah",
        update_interval: float = 1.0,
        gmc_method: str | None = None,
    ):
        self.settings = settings
        self.kalman = BoxKalman(form)
        self.update_interval = update_interval
        self.gmc_method = gmc_method
        self.tracks = _Table()
        self._slots: dict[str, int] = {}
        self._frames = np.zeros(0, np.int64)  # per camera slot: frames stepped since its tracker (re)started
        self._next_uid = np.zeros(0, np.int64)
        self._gmc: dict[int, Any] = {}
        self._order = 0

    def _pending(self, cameras: list[str]) -> _Pending:
        """Slots for this step's cameras (new ones get the next free numbers), and copies of the counters."""
        slots = dict(self._slots)
        for camera in cameras:
            slots.setdefault(camera, len(slots))
        added = len(slots) - len(self._slots)
        return _Pending(
            slots,
            np.concatenate([self._frames, np.zeros(added, np.int64)]),
            np.concatenate([self._next_uid, np.ones(added, np.int64)]),
            self._order,
        )

    def live_track_ids(self, camera: str) -> set[int]:
        slot = self._slots.get(camera)
        if slot is None:
            return set()
        return set(self.tracks.uid[(self.tracks.cam == slot) & (self.tracks.uid > 0)].tolist())

    def drop_camera(self, camera: str) -> list[EndedTrack]:
        """Its source ended: end its confirmed tracks; its next tracker starts afresh but goes on numbering."""
        slot = self._slots.get(camera)
        if slot is None:
            return []
        mine = self.tracks.cam == slot
        ended = self._ended(self.tracks.take(np.flatnonzero(mine)))
        self.tracks = self.tracks.take(np.flatnonzero(~mine))
        self._frames[slot] = 0
        self._gmc.pop(slot, None)
        return ended

    def step(self, frames: Sequence[CameraFrame]) -> list[FrameTracks]:
        """One frame of each of several cameras (each camera at most once)."""
        s, kalman = self.settings, self.kalman
        count = len(frames)
        pending = self._pending([f.camera for f in frames])
        slots = np.array([pending.slots[f.camera] for f in frames], np.int64)
        if len(np.unique(slots)) != count:
            raise ValueError("MultiCameraTracker.step takes at most one frame per camera")
        frame_id = pending.frames[slots] + 1
        ts = np.array([f.ts for f in frames], np.float64)

        # Detections of all frames, flat: boxes through float32 centre/size as ultralytics reads them.
        det_count = np.array([len(f.detections) for f in frames], np.int64)
        det_start = np.concatenate([[0], np.cumsum(det_count)[:-1]])
        det_pos = np.repeat(np.arange(count), det_count)
        xyxy = np.concatenate([f.detections.xyxy for f in frames]) if count else np.zeros((0, 4), np.float32)
        conf = np.concatenate([f.detections.confidence for f in frames]) if count else np.zeros(0, np.float32)
        wh = xyxy[:, 2:] - xyxy[:, :2]
        xywh = np.concatenate([xyxy[:, :2] + wh / 2, wh], axis=1).astype(np.float64)
        xywh[:, :2] -= xywh[:, 2:] / 2
        ltwh = xywh.astype(np.float32)
        det_boxes = np.concatenate([ltwh[:, :2], ltwh[:, :2] + ltwh[:, 2:]], axis=1)
        measurement = kalman.measure(ltwh).astype(np.float64)
        valid = (wh[:, 0] > 0) & (wh[:, 1] > 0)
        high = valid & (conf >= s.high_thresh)
        low = valid & (conf > s.low_thresh) & (conf < s.high_thresh)

        # This step's tracks, sorted by camera, then tracked / lost / unconfirmed, then list order.
        pos_of_slot = np.full(len(pending.frames), -1, np.int64)
        pos_of_slot[slots] = np.arange(count)
        tracks = self.tracks
        in_step = pos_of_slot[tracks.cam] >= 0
        table_rows = np.flatnonzero(in_step)
        pos = pos_of_slot[tracks.cam[table_rows]]
        group = np.where(tracks.activated[table_rows], tracks.state[table_rows], _UNCONFIRMED)
        order = np.lexsort((tracks.order[table_rows], group, pos))
        table_rows, pos, group = table_rows[order], pos[order], group[order]
        rows = tracks.take(table_rows)

        pool = group != _UNCONFIRMED
        if self.kalman.form == "xyah":
            rows.mean[group == LOST, 7] = 0
        else:
            rows.mean[group == LOST, 6:8] = 0
        if pool.any():
            rows.mean[pool], rows.cov[pool] = kalman.predict(rows.mean[pool], rows.cov[pool])
        if self.gmc_method is not None:
            self._compensate_motion(frames, slots, rows, pos, xyxy[high], det_pos[high], pending)

        # One IoU computation for every camera's tracks against its detections.
        row_rank, row_count = _ranks(pos, count)
        det_rank = np.arange(len(conf)) - det_start[det_pos]
        track_boxes = kalman.boxes(rows.mean).astype(np.float32)
        width_t, width_d = int(row_count.max(initial=0)), int(det_count.max(initial=0))
        cost = 1 - pairwise_iou(
            _padded(track_boxes, pos, row_rank, count, width_t), _padded(det_boxes, det_pos, det_rank, count, width_d)
        )
        fused = cost
        if s.fuse_score:
            fused = 1 - (1 - cost) * _padded(conf, det_pos, det_rank, count, width_d)[:, None, :]

        matched_rows, matched_dets, lost_rows, removed_rows, new_dets = [], [], [], [], []
        row_start = np.concatenate([[0], np.cumsum(row_count)[:-1]])
        for p in range(count):
            n_rows, n_dets = int(row_count[p]), int(det_count[p])
            if n_rows == 0 and n_dets == 0:
                continue
            r0, d0 = int(row_start[p]), int(det_start[p])
            groups = group[r0 : r0 + n_rows]
            n_tracked = int(np.count_nonzero(groups == TRACKED))
            n_pool = n_tracked + int(np.count_nonzero(groups == LOST))
            hi = np.flatnonzero(high[d0 : d0 + n_dets])
            lo = np.flatnonzero(low[d0 : d0 + n_dets])
            # 1: tracked and lost tracks against confident detections.
            x, y = assign(fused[p, :n_pool][:, hi], s.match_thresh)
            hit = x >= 0
            matched_rows.append(r0 + np.flatnonzero(hit))
            matched_dets.append(d0 + hi[x[hit]])
            unmatched = np.flatnonzero(~hit)
            remaining = hi[y < 0]
            # 2: tracked tracks left over against the less confident detections; unmatched ones are lost.
            still_tracked = unmatched[unmatched < n_tracked]
            x, _ = assign(cost[p][still_tracked][:, lo], SECOND_STAGE_THRESH)
            hit = x >= 0
            matched_rows.append(r0 + still_tracked[hit])
            matched_dets.append(d0 + lo[x[hit]])
            lost_rows.append(r0 + still_tracked[~hit])
            # 3: tracks seen once against the confident detections left; unmatched ones are dropped.
            unconfirmed = np.arange(n_pool, n_rows)
            if len(unconfirmed):
                x, y = assign(fused[p][unconfirmed][:, remaining], UNCONFIRMED_THRESH)
                hit = x >= 0
                matched_rows.append(r0 + unconfirmed[hit])
                matched_dets.append(d0 + remaining[x[hit]])
                removed_rows.append(r0 + unconfirmed[~hit])
                remaining = remaining[y < 0]
            # 4: new tracks from what is left.
            new_dets.append(d0 + remaining[conf[d0 + remaining] >= s.new_track_thresh])

        return self._commit(
            frames, pending, slots, frame_id, ts, table_rows, rows, pos, group,
            _cat(matched_rows), _cat(matched_dets), _cat(lost_rows), _cat(removed_rows), _cat(new_dets),
            det_pos, det_start, det_count, measurement, det_boxes,
        )  # fmt: skip

    def _compensate_motion(
        self,
        frames: Sequence[CameraFrame],
        slots: np.ndarray,
        rows: _Table,
        pos: np.ndarray,
        high_xyxy: np.ndarray,
        high_pos: np.ndarray,
        pending: _Pending,
    ) -> None:
        from ultralytics.trackers.utils.gmc import GMC

        for p, frame in enumerate(frames):
            if frame.image is None:
                continue
            slot = int(slots[p])
            known = self._gmc.get(slot)
            # GMC.apply replaces its previous frame and key points (never changes them in place): a shallow copy
            # keeps the committed one as it was until the step commits.
            gmc = pending.gmc[slot] = copy.copy(known) if known is not None else GMC(method=self.gmc_method)
            try:
                affine = gmc.apply(frame.image, high_xyxy[high_pos == p])
            except Exception as exc:  # e.g. the camera's frame size changed: start afresh from this frame
                log.warning("%s camera-motion compensation failed on camera %s frame %d (%s: %s); restarting it",
                            self.gmc_method, frame.camera, frame.index, type(exc).__name__, exc)  # fmt: skip
                gmc = pending.gmc[slot] = GMC(method=self.gmc_method)
                affine = gmc.apply(frame.image, high_xyxy[high_pos == p])
            mine = pos == p
            if mine.any() and not np.array_equal(affine, np.eye(2, 3)):
                rows.mean[mine], rows.cov[mine] = self.kalman.warp(rows.mean[mine], rows.cov[mine], affine)

    def _commit(
        self,
        frames: Sequence[CameraFrame],
        pending: _Pending,
        slots: np.ndarray,
        frame_id: np.ndarray,
        ts: np.ndarray,
        table_rows: np.ndarray,
        rows: _Table,
        pos: np.ndarray,
        group: np.ndarray,
        matched_rows: np.ndarray,
        matched_dets: np.ndarray,
        lost_rows: np.ndarray,
        removed_rows: np.ndarray,
        new_dets: np.ndarray,
        det_pos: np.ndarray,
        det_start: np.ndarray,
        det_count: np.ndarray,
        measurement: np.ndarray,
        det_boxes: np.ndarray,
    ) -> list[FrameTracks]:
        s, kalman = self.settings, self.kalman
        count = len(frames)
        dets_of = np.empty(count, object)
        dets_of[:] = [f.detections for f in frames]
        index_of = np.array([f.index for f in frames], np.int64)

        # Matched tracks: one Kalman update; lost ones found again go to the end of the tracked list.
        if len(matched_rows):
            rows.mean[matched_rows], rows.cov[matched_rows] = kalman.update(
                rows.mean[matched_rows], rows.cov[matched_rows], measurement[matched_dets]
            )
        refound = matched_rows[group[matched_rows] == LOST]
        rows.state[matched_rows] = TRACKED
        rows.activated[matched_rows] = True
        rows.frame_id[matched_rows] = frame_id[pos[matched_rows]]
        rows.det[matched_rows] = matched_dets - det_start[pos[matched_rows]]
        rows.state[lost_rows] = LOST
        keep = np.ones(len(rows), bool)
        keep[removed_rows] = False

        # New tracks (a tracker's first frame confirms them at once, as in ByteTrack).
        new = _Table(len(new_dets))
        new_pos = det_pos[new_dets]
        new.cam = slots[new_pos]
        new.state[:] = TRACKED
        new.activated = frame_id[new_pos] == 1
        new.frame_id = new.start_frame = frame_id[new_pos]
        new.mean, new.cov = kalman.initiate(measurement[new_dets])
        new.det = new_dets - det_start[new_pos]
        # List order: new tracks, then those found again, then (lost list) the newly lost.
        new.order = pending.next_orders(len(new_dets))
        rows.order[refound] = pending.next_orders(len(refound))
        rows.order[lost_rows] = pending.next_orders(len(lost_rows))

        # Lost too long, or a tracked and a lost track on the same object (the younger one goes). Like ultralytics
        # and the original ByteTrack, a lost track past `max_frames_lost` is marked removed but leaves the lost list
        # only on the next frame (where it can still be matched); one marked once leaves as soon as it is lost.
        stale = rows.marked & (rows.state == LOST)
        rows.marked |= (group == LOST) & (rows.state == LOST) & (frame_id[pos] - rows.frame_id > s.max_frames_lost)
        keep &= ~stale
        step = rows.take(np.flatnonzero(keep)) if not keep.all() else rows
        if len(new):
            step.extend(new)
        step_pos = np.concatenate([pos[keep], new_pos])
        keep_step = self._drop_duplicates(step, step_pos, count)
        gone = rows.take(np.flatnonzero(~keep))
        if not keep_step.all():
            gone.extend(step.take(np.flatnonzero(~keep_step)))
            step, step_pos = step.take(np.flatnonzero(keep_step)), step_pos[keep_step]

        # Confirmed tracks seen on this frame: ids for new ones, lifecycle, update events.
        shown = np.flatnonzero((step.state == TRACKED) & step.activated)
        confirm = shown[step.uid[shown] == 0]
        confirm = confirm[np.lexsort((step.order[confirm], step_pos[confirm]))]
        rank, per_pos = _ranks(step_pos[confirm], count)
        step.uid[confirm] = pending.next_uid[slots[step_pos[confirm]]] + rank
        pending.next_uid[slots] += per_pos
        confirm_pos = step_pos[confirm]
        step.first_ts[confirm] = step.last_event_ts[confirm] = ts[confirm_pos]
        step.first_index[confirm] = index_of[confirm_pos]
        shown_pos = step_pos[shown]
        step.seen[shown] += 1
        step.last_ts[shown] = ts[shown_pos]
        step.last_index[shown] = index_of[shown_pos]
        step.dets[shown] = dets_of[shown_pos]
        due = shown[(step.seen[shown] > 1) & (ts[shown_pos] - step.last_event_ts[shown] >= self.update_interval)]
        step.last_event_ts[due] = ts[step_pos[due]]

        tracker_id = np.full(int(det_count.sum()), NO_TRACK, np.int64)
        tracker_id[det_start[shown_pos] + step.det[shown]] = step.uid[shown]
        ended = self._ended(gone)
        ended_by_slot: dict[int, list[EndedTrack]] = {}
        gone_slots = gone.cam[gone.uid > 0]
        for track, slot in zip(ended, gone_slots.tolist(), strict=True):
            ended_by_slot.setdefault(slot, []).append(track)
        results = []
        for p in range(count):
            start, n = int(det_start[p]), int(det_count[p])
            new_here, due_here = confirm[confirm_pos == p], due[step_pos[due] == p]
            results.append(
                FrameTracks(
                    tracker_id=tracker_id[start : start + n],
                    new=step.det[new_here],
                    due=step.det[due_here],
                    age_s=ts[p] - step.first_ts[due_here],
                    ended=ended_by_slot.get(int(slots[p]), []),
                )
            )

        # Commit: this step's cameras' rows are replaced by what the step kept, and the counters move on.
        pending.frames[slots] = frame_id
        if len(table_rows) == len(self.tracks):
            tracks = step
        else:
            others = np.ones(len(self.tracks), bool)
            others[table_rows] = False
            tracks = self.tracks.take(np.flatnonzero(others))
            tracks.extend(step)
        self.tracks = tracks
        self._slots, self._frames, self._next_uid, self._order = (
            pending.slots, pending.frames, pending.next_uid, pending.order
        )  # fmt: skip
        self._gmc.update(pending.gmc)
        return results

    def _drop_duplicates(self, step: _Table, step_pos: np.ndarray, count: int) -> np.ndarray:
        """Keep-mask: a tracked and a lost track with IoU over 0.85 are one object; the shorter-lived one goes."""
        keep = np.ones(len(step), bool)
        tracked, lost = np.flatnonzero(step.state == TRACKED), np.flatnonzero(step.state == LOST)
        if not len(tracked) or not len(lost):
            return keep
        tracked = tracked[np.lexsort((step.order[tracked], step_pos[tracked]))]
        lost = lost[np.lexsort((step.order[lost], step_pos[lost]))]
        boxes = self.kalman.boxes(step.mean).astype(np.float32)
        t_rank, t_count = _ranks(step_pos[tracked], count)
        l_rank, l_count = _ranks(step_pos[lost], count)
        iou = pairwise_iou(
            _padded(boxes[tracked], step_pos[tracked], t_rank, count, int(t_count.max())),
            _padded(boxes[lost], step_pos[lost], l_rank, count, int(l_count.max())),
        )
        p, i, j = np.nonzero(1 - iou < DUPLICATE_IOU_DISTANCE)
        valid = (i < t_count[p]) & (j < l_count[p])
        p, i, j = p[valid], i[valid], j[valid]
        if not len(p):
            return keep
        a = tracked[np.concatenate([[0], np.cumsum(t_count)[:-1]])[p] + i]
        b = lost[np.concatenate([[0], np.cumsum(l_count)[:-1]])[p] + j]
        a_age = step.frame_id[a] - step.start_frame[a]
        b_age = step.frame_id[b] - step.start_frame[b]
        keep[b[a_age > b_age]] = False
        keep[a[a_age <= b_age]] = False
        return keep

    @staticmethod
    def _ended(gone: _Table) -> list[EndedTrack]:
        confirmed = np.flatnonzero(gone.uid > 0)
        return [
            EndedTrack(
                int(gone.uid[r]),
                gone.dets[r],
                int(gone.det[r]),
                float(gone.first_ts[r]),
                float(gone.last_ts[r]),
                int(gone.first_index[r]),
                int(gone.last_index[r]),
                int(gone.seen[r]),
            )
            for r in confirmed
        ]


class UltralyticsView:
    """Detections as the results-like object ultralytics' trackers read (`conf`, `cls`, `xywh`, `xyxy`, boolean
    indexing): to run them side by side with this module, in tests/test_multicamera_tracker.py and bench/trackers.py."""

    def __init__(self, detections: Detections):
        self.xyxy, self.conf, self.cls = detections.xyxy, detections.confidence, detections.class_id

    @property
    def xywh(self) -> np.ndarray:
        wh = self.xyxy[:, 2:4] - self.xyxy[:, 0:2]
        return np.concatenate([self.xyxy[:, 0:2] + wh / 2, wh], axis=1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, index: Any) -> UltralyticsView:
        view = UltralyticsView.__new__(UltralyticsView)
        view.xyxy, view.conf, view.cls = self.xyxy[index], self.conf[index], self.cls[index]
        return view


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
