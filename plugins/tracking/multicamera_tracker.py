"""ByteTrack's association for every camera of a batch at once.

Why not ultralytics' BYTETracker, one per camera: it keeps a Python object per track and per detection and runs
the Kalman update track by track, which costs about 1 ms per frame at 30 objects, a ceiling of a few hundred
cameras' frames per second for a whole process. This module holds the tracks of all cameras as one table of
arrays (track_table.py) and runs, per batch, one Kalman predict (box_kalman.py), one float32 IoU computation (padded
camera by camera) and one Kalman update for all of them. Only ByteTrack's stages around `lap.lapjv`
(association.py) run per camera (it solves one matrix per call).

The algorithm is ultralytics' ByteTrack step for step (the same stages, thresholds, order of tracks in each stage,
float32 cost matrices and dedup of tracked against lost tracks), and BoT-SORT's motion model and camera-motion
compensation (camera_motion.py) with `form="xywh"`; tests/test_multicamera_tracker.py checks frame by frame that
it gives the tracks ultralytics gives. Ids are numbered per camera from 1 when a track is first confirmed, never
reused on a camera. What a plugin makes of the tracks (events, their cadence) is the plugin's.

Every step first computes, then commits: it works on copies (its cameras' rows of the table, a `_Pending` copy of
the counters and of the camera-motion compensators), and `_commit`, its last call, is the only place where the
tracker changes, so a step that raises leaves the tracker as it was."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vigild.frame import NO_TRACK, Detections
from vigild.plugins.tracking.association import (
    UNCONFIRMED,
    AssociationSettings,
    Matches,
    associate,
    drop_duplicates,
    padded,
    pairwise_iou,
    ranks,
)
from vigild.plugins.tracking.box_kalman import BoxForm, BoxKalman
from vigild.plugins.tracking.camera_motion import CameraMotion
from vigild.plugins.tracking.track_table import LOST, TRACKED, Sightings, TrackTable


@dataclass
class CameraFrame:
    camera: str
    detections: Detections
    ts: float
    index: int
    image: np.ndarray | None = None
    """Only read for camera-motion compensation."""


@dataclass
class FrameTracks:
    tracker_id: np.ndarray
    """(N,) per detection of the frame: its track's id, or NO_TRACK."""
    new: np.ndarray
    """Indices of detections whose track was confirmed on this frame, in the order of their ids."""
    tracked: np.ndarray
    """Indices of every detection with a track id (`new` among them), in the order of the tracker's lists."""
    ended: Detections
    """The tracks that ended: each one's last sighting, with its lifetime (`vigild.frame.EndedTracks`)."""


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


@dataclass
class _Batch:
    """A step's frames (`pos`: a frame's position in the batch) and their detections, flat."""

    frames: Sequence[CameraFrame]
    slots: np.ndarray  # per frame: its camera's slot
    frame_id: np.ndarray  # per frame: frames its camera's tracker has stepped, this one included
    ts: np.ndarray
    index: np.ndarray
    seen: Sightings  # per detection: what a track keeps of it
    det_start: np.ndarray  # per frame: where its detections start in the flat arrays
    det_count: np.ndarray
    det_pos: np.ndarray  # per detection: its frame's pos
    xyxy: np.ndarray
    conf: np.ndarray
    high: np.ndarray  # per detection: matched in the first stage
    low: np.ndarray  # per detection: matched in the second stage
    boxes: np.ndarray  # float32 xyxy through centre/size, as ultralytics reads them
    measurement: np.ndarray  # the Kalman filter's


@dataclass
class _Selected:
    """The tracks of the step's cameras, copied out of the table (`rows`: where they are in it) and sorted by their
    frame's pos, then `group` (TRACKED, LOST, UNCONFIRMED), then list order."""

    rows: np.ndarray
    tracks: TrackTable
    pos: np.ndarray
    group: np.ndarray


@dataclass
class _Outcome:
    """The step's cameras' tracks after it, and those it ended, before the step commits."""

    tracks: TrackTable
    pos: np.ndarray
    gone: TrackTable
    confirmed: np.ndarray  # rows of `tracks` confirmed on this step, in the order of their ids
    shown: np.ndarray  # rows of `tracks` with an id seen on this step


class MultiCameraTracker:
    def __init__(self, settings: AssociationSettings, form: BoxForm = "xyah", gmc_method: str | None = None):
        self.settings = settings
        self.kalman = BoxKalman(form)
        self.motion = CameraMotion(gmc_method) if gmc_method is not None else None
        self.tracks = TrackTable.empty()
        self._slots: dict[str, int] = {}
        self._frames = np.zeros(0, np.int64)  # per camera slot: frames stepped since its tracker (re)started
        self._next_uid = np.zeros(0, np.int64)
        self._order = 0

    def drop_camera(self, camera: str) -> Detections:
        """Its source ended: end its confirmed tracks; its next tracker starts afresh but goes on numbering."""
        slot = self._slots.get(camera)
        if slot is None:
            return _NONE_ENDED
        mine = self.tracks.cam == slot
        ended = self._ended(self.tracks.take(np.flatnonzero(mine)))
        self.tracks = self.tracks.take(np.flatnonzero(~mine))
        self._frames[slot] = 0
        if self.motion is not None:
            self.motion.forget(slot)
        return ended

    def step(self, frames: Sequence[CameraFrame]) -> list[FrameTracks]:
        """One frame of each of several cameras (each camera at most once)."""
        pending = self._pending([f.camera for f in frames])
        batch = self._batch(frames, pending)
        selected = self._select(batch, pending)
        self._predict(batch, selected, pending)
        outcome = self._advance(batch, selected, self._associate(batch, selected), pending)
        results = self._results(batch, outcome)
        self._commit(batch, pending, selected.rows, outcome.tracks)
        return results

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

    def _batch(self, frames: Sequence[CameraFrame], pending: _Pending) -> _Batch:
        s, count = self.settings, len(frames)
        slots = np.array([pending.slots[f.camera] for f in frames], np.int64)
        if len(np.unique(slots)) != count:
            raise ValueError("MultiCameraTracker.step takes at most one frame per camera")
        det_count = np.array([len(f.detections) for f in frames], np.int64)
        xyxy = np.concatenate([f.detections.xyxy for f in frames]) if count else np.zeros((0, 4), np.float32)
        conf = np.concatenate([f.detections.confidence for f in frames]) if count else np.zeros(0, np.float32)
        wh = xyxy[:, 2:] - xyxy[:, :2]
        xywh = np.concatenate([xyxy[:, :2] + wh / 2, wh], axis=1).astype(np.float64)
        xywh[:, :2] -= xywh[:, 2:] / 2
        ltwh = xywh.astype(np.float32)
        valid = (wh[:, 0] > 0) & (wh[:, 1] > 0)
        det_pos = np.repeat(np.arange(count), det_count)
        return _Batch(
            frames,
            slots,
            frame_id=pending.frames[slots] + 1,
            ts=np.array([f.ts for f in frames], np.float64),
            index=np.array([f.index for f in frames], np.int64),
            seen=Sightings.of([f.detections for f in frames], xyxy, conf, det_pos),
            det_start=np.concatenate([[0], np.cumsum(det_count)[:-1]]),
            det_count=det_count,
            det_pos=det_pos,
            xyxy=xyxy,
            conf=conf,
            high=valid & (conf >= s.high_thresh),
            low=valid & (conf > s.low_thresh) & (conf < s.high_thresh),
            boxes=np.concatenate([ltwh[:, :2], ltwh[:, :2] + ltwh[:, 2:]], axis=1),
            measurement=self.kalman.measure(ltwh).astype(np.float64),
        )

    def _select(self, batch: _Batch, pending: _Pending) -> _Selected:
        pos_of_slot = np.full(len(pending.frames), -1, np.int64)
        pos_of_slot[batch.slots] = np.arange(len(batch.frames))
        table = self.tracks
        rows = np.flatnonzero(pos_of_slot[table.cam] >= 0)
        pos = pos_of_slot[table.cam[rows]]
        group = np.where(table.activated[rows], table.state[rows], UNCONFIRMED)
        order = np.lexsort((table.order[rows], group, pos))
        rows, pos, group = rows[order], pos[order], group[order]
        return _Selected(rows, table.take(rows), pos, group)

    def _predict(self, batch: _Batch, selected: _Selected, pending: _Pending) -> None:
        tracks, group = selected.tracks, selected.group
        if self.kalman.form == "xyah":
            tracks.mean[group == LOST, 7] = 0
        else:
            tracks.mean[group == LOST, 6:8] = 0
        pool = group != UNCONFIRMED
        if pool.any():
            tracks.mean[pool], tracks.cov[pool] = self.kalman.predict(tracks.mean[pool], tracks.cov[pool])
        if self.motion is None:
            return
        high_xyxy, high_pos = batch.xyxy[batch.high], batch.det_pos[batch.high]
        for p, frame in enumerate(batch.frames):
            if frame.image is None:
                continue
            affine = self.motion.estimate(int(batch.slots[p]), frame, high_xyxy[high_pos == p], pending.gmc)
            mine = selected.pos == p
            if mine.any() and not np.array_equal(affine, np.eye(2, 3)):
                tracks.mean[mine], tracks.cov[mine] = self.kalman.warp(tracks.mean[mine], tracks.cov[mine], affine)

    def _associate(self, batch: _Batch, selected: _Selected) -> Matches:
        """One IoU computation for every camera's tracks against its detections, then ByteTrack's stages camera by
        camera: the matches as rows of `selected.tracks` and flat detection indices."""
        s, count, pos = self.settings, len(batch.frames), selected.pos
        row_rank, row_count = ranks(pos, count)
        det_rank = np.arange(len(batch.conf)) - batch.det_start[batch.det_pos]
        track_boxes = self.kalman.boxes(selected.tracks.mean).astype(np.float32)
        width_t, width_d = int(row_count.max(initial=0)), int(batch.det_count.max(initial=0))
        cost = 1 - pairwise_iou(
            padded(track_boxes, pos, row_rank, count, width_t),
            padded(batch.boxes, batch.det_pos, det_rank, count, width_d),
        )
        fused = cost
        if s.fuse_score:
            fused = 1 - (1 - cost) * padded(batch.conf, batch.det_pos, det_rank, count, width_d)[:, None, :]
        matched_rows, matched_dets, lost, removed, new = [], [], [], [], []
        row_start = np.concatenate([[0], np.cumsum(row_count)[:-1]])
        for p in range(count):
            n_rows, n_dets = int(row_count[p]), int(batch.det_count[p])
            if n_rows == 0 and n_dets == 0:
                continue
            r0, d0 = int(row_start[p]), int(batch.det_start[p])
            dets = slice(d0, d0 + n_dets)
            m = associate(cost[p, :n_rows, :n_dets], fused[p, :n_rows, :n_dets], selected.group[r0 : r0 + n_rows],
                          batch.high[dets], batch.low[dets], batch.conf[dets], s)  # fmt: skip
            matched_rows.append(r0 + m.rows)
            matched_dets.append(d0 + m.dets)
            lost.append(r0 + m.lost)
            removed.append(r0 + m.removed)
            new.append(d0 + m.new)
        return Matches(_cat(matched_rows), _cat(matched_dets), _cat(lost), _cat(removed), _cat(new))

    def _advance(self, batch: _Batch, selected: _Selected, m: Matches, pending: _Pending) -> _Outcome:
        """The matched tracks updated, the unmatched lost or dropped, new tracks started; then ids and lifecycle."""
        s, kalman, frame_id = self.settings, self.kalman, batch.frame_id
        tracks, pos, group = selected.tracks, selected.pos, selected.group
        matched, found = m.rows, m.dets

        # Matched tracks: one Kalman update; lost ones found again go to the end of the tracked list.
        if len(matched):
            tracks.mean[matched], tracks.cov[matched] = kalman.update(
                tracks.mean[matched], tracks.cov[matched], batch.measurement[found]
            )
        refound = matched[group[matched] == LOST]
        tracks.state[matched] = TRACKED
        tracks.activated[matched] = True
        tracks.frame_id[matched] = frame_id[pos[matched]]
        tracks.det[matched] = found - batch.det_start[pos[matched]]
        tracks.state[m.lost] = LOST
        keep = np.ones(len(tracks), bool)
        keep[m.removed] = False

        # New tracks (a tracker's first frame confirms them at once, as in ByteTrack).
        new = TrackTable.empty(len(m.new))
        new_pos = batch.det_pos[m.new]
        new.cam = batch.slots[new_pos]
        new.state[:] = TRACKED
        new.activated = frame_id[new_pos] == 1
        new.frame_id = new.start_frame = frame_id[new_pos]
        new.mean, new.cov = kalman.initiate(batch.measurement[m.new])
        new.det = m.new - batch.det_start[new_pos]
        # List order: new tracks, then those found again, then (lost list) the newly lost.
        new.order = pending.next_orders(len(m.new))
        tracks.order[refound] = pending.next_orders(len(refound))
        tracks.order[m.lost] = pending.next_orders(len(m.lost))

        # Lost too long, or a tracked and a lost track on the same object (the younger one goes). Like ultralytics
        # and the original ByteTrack, a lost track past `max_frames_lost` is marked removed but leaves the lost list
        # only on the next frame (where it can still be matched); one marked once leaves as soon as it is lost.
        stale = tracks.marked & (tracks.state == LOST)
        tracks.marked |= (
            (group == LOST) & (tracks.state == LOST) & (frame_id[pos] - tracks.frame_id > s.max_frames_lost)
        )
        keep &= ~stale
        after = tracks.take(np.flatnonzero(keep)) if not keep.all() else tracks
        if len(new):
            after = after.concat(new)
        after_pos = np.concatenate([pos[keep], new_pos])
        gone = tracks.take(np.flatnonzero(~keep))
        unique = drop_duplicates(after, after_pos, len(batch.frames), kalman.boxes)
        if not unique.all():
            gone = gone.concat(after.take(np.flatnonzero(~unique)))
            after, after_pos = after.take(np.flatnonzero(unique)), after_pos[unique]
        return self._confirm(batch, after, after_pos, gone, pending)

    def _confirm(
        self, batch: _Batch, tracks: TrackTable, pos: np.ndarray, gone: TrackTable, pending: _Pending
    ) -> _Outcome:
        """Confirmed tracks seen on this frame: ids for new ones, in list order per camera; their lifecycle."""
        shown = np.flatnonzero((tracks.state == TRACKED) & tracks.activated)
        confirm = shown[tracks.uid[shown] == 0]
        confirm = confirm[np.lexsort((tracks.order[confirm], pos[confirm]))]
        rank, per_pos = ranks(pos[confirm], len(batch.frames))
        tracks.uid[confirm] = pending.next_uid[batch.slots[pos[confirm]]] + rank
        pending.next_uid[batch.slots] += per_pos
        confirm_pos = pos[confirm]
        tracks.first_ts[confirm] = batch.ts[confirm_pos]
        tracks.first_index[confirm] = batch.index[confirm_pos]
        shown_pos = pos[shown]
        tracks.seen[shown] += 1
        tracks.last_ts[shown] = batch.ts[shown_pos]
        tracks.last_index[shown] = batch.index[shown_pos]
        tracks.saw(shown, batch.seen, batch.det_start[shown_pos] + tracks.det[shown])
        return _Outcome(tracks, pos, gone, confirm, shown)

    def _results(self, batch: _Batch, outcome: _Outcome) -> list[FrameTracks]:
        tracks, pos, shown, confirmed = outcome.tracks, outcome.pos, outcome.shown, outcome.confirmed
        shown_pos, confirmed_pos = pos[shown], pos[confirmed]
        tracker_id = np.full(int(batch.det_count.sum()), NO_TRACK, np.int64)
        tracker_id[batch.det_start[shown_pos] + tracks.det[shown]] = tracks.uid[shown]
        ended = self._ended(outcome.gone)
        ended_cam = outcome.gone.cam[outcome.gone.uid > 0] if len(ended) else outcome.gone.cam[:0]
        results = []
        for p, (start, n, slot) in enumerate(zip(batch.det_start.tolist(), batch.det_count.tolist(),
                                                 batch.slots.tolist(), strict=True)):  # fmt: skip
            results.append(
                FrameTracks(
                    tracker_id=tracker_id[start : start + n],
                    new=tracks.det[confirmed[confirmed_pos == p]],
                    tracked=tracks.det[shown[shown_pos == p]],
                    ended=ended[ended_cam == slot] if len(ended) and (ended_cam == slot).any() else _NONE_ENDED,
                )
            )
        return results

    def _commit(self, batch: _Batch, pending: _Pending, table_rows: np.ndarray, tracks: TrackTable) -> None:
        """This step's cameras' rows are replaced by what the step kept, and the counters move on."""
        pending.frames[batch.slots] = batch.frame_id
        if len(table_rows) != len(self.tracks):
            others = np.ones(len(self.tracks), bool)
            others[table_rows] = False
            tracks = self.tracks.take(np.flatnonzero(others)).concat(tracks)
        self.tracks = tracks
        self._slots, self._frames, self._next_uid, self._order = (
            pending.slots, pending.frames, pending.next_uid, pending.order
        )  # fmt: skip
        if self.motion is not None:
            self.motion.commit(pending.gmc)

    @staticmethod
    def _ended(gone: TrackTable) -> Detections:
        return gone.ended() if (gone.uid > 0).any() else _NONE_ENDED


_NONE_ENDED = TrackTable.empty().ended()


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
