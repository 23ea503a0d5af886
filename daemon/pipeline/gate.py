"""The motion gate: which frames of a camera with `motion:` go through the chain (docs/motion.md).

Per frame, on the scheduler thread, before the batch is detected: motion on a small grey copy
(vigild.vision.motion). A frame goes through the chain when
- it is the camera's first (since it started or came back): the background for motion, and the tracker's first
  frame, on which a tracker confirms what it sees at once, as without gating, or
- something moved on it (outside the masks), or
- a track the chain follows is moving (its box moved within `stationary_after_s`), or was not seen on the last
  frame that went through (lost: it must be found again, or end, at the camera's rate), or
- detections the tracker has not taken up yet (a track being confirmed) were on the last frame that went through,
  for up to `TENTATIVE_FRAMES` quiet frames, or
- tracks stand still and `stationary_interval_s` has passed since the last frame went through (they are kept
  alive by this detection every so often).
Every other frame is gated: it skips the chain (its detections are those of the last frame that went through, for
snapshots and the live view). The tracker sees only the frames that go through: its clock is frames processed, so
gated frames never age a track (plugins/tracking: `max_frames_lost` counts processed frames).

What the gate knows of the tracks comes with the frames (their detections' tracker ids and `frame.tracks.ended`):
it never calls into a plugin. With `detect: regions` it tells the detector where to look (`frame.motion.regions`):
what moved, and the boxes of the tracks it follows, padded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from vigild.capture.exchange import Notice
from vigild.config.motion import MotionConfig, mask_warnings
from vigild.frame import NO_TRACK, Detections, Frame, Motion
from vigild.vision.motion import MotionDetector

log = logging.getLogger("vigild.motion")

TENTATIVE_FRAMES = 3
"""Quiet frames after one with detections but no track id (a track being confirmed) that still go through."""
FAILURE_LOG_S = 60.0
"""A camera's gate failures are logged at most this often."""
LOST_FRAMES = 150
"""A track the gate has not seen on this many frames that went through is forgotten, ended or not (a tracker that
never reports `ended`, or keeps lost tracks for minutes, must not keep the detector running forever)."""
STILL_IOU = 0.8
"""A track's box with at least this IoU with where it was when it last moved has not moved."""
_NO_BOXES = np.zeros((0, 4), np.float32)


@dataclass
class MotionCounts:
    """One camera's counters (status `cameras.<name>.motion`, metrics `vigild_motion_*`)."""

    fraction: float = 0.0
    """Share of the last frame that moved."""
    gated: int = 0
    detected: int = 0
    global_changes: int = 0
    crops: int = 0
    """Crops the detector ran on (`detect: regions`), over the `detected` frames."""

    def snapshot(self) -> dict[str, float | int]:
        frames = self.gated + self.detected
        return {
            "fraction": round(self.fraction, 4),
            "gated": self.gated,
            "detected": self.detected,
            "saved": round(self.gated / frames, 4) if frames else 0.0,
            "crops_per_frame": round(self.crops / self.detected, 3) if self.detected else 0.0,
            "global_changes": self.global_changes,
        }


@dataclass
class _Tracks:
    """The tracks of a camera as the frames that went through showed them, sorted by id."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    box: np.ndarray = field(default_factory=lambda: _NO_BOXES)
    anchor: np.ndarray = field(default_factory=lambda: _NO_BOXES)
    """Where each track was when it last moved."""
    moved_at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    """Seen on the last frame that went through."""
    unseen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Frames that went through since each was last seen."""
    untracked: np.ndarray = field(default_factory=lambda: _NO_BOXES)
    """Boxes of that frame's detections without a track id."""


class CameraGate:
    """One camera's motion and what its tracks need."""

    def __init__(self, config: MotionConfig):
        self.config = config
        self.motion = MotionDetector(config)
        self.counts = MotionCounts()
        self.tracks = _Tracks()
        self.last_through: float | None = None
        """`ts_mono` of the last frame that went through."""
        self.quiet = 0
        """Frames without motion since the last with some."""
        self.last_detections: Detections | None = None

    def decide(self, frame: Frame) -> bool:
        """Motion on `frame`, and whether it goes through the chain (sets `frame.motion`)."""
        config, tracks, now = self.config, self.tracks, frame.ts_mono
        first = self.last_through is None  # the camera's first frame (or the first since it came back)
        moved = self.motion(frame.image)
        counts = self.counts
        counts.fraction = moved.fraction
        counts.global_changes += moved.global_change
        self.quiet = 0 if len(moved.boxes) else self.quiet + 1
        live = len(tracks.ids) > 0
        through = bool(
            first  # the background for motion; the tracker's first frame, as without gating
            or len(moved.boxes)
            or (live and not tracks.seen.all())  # a track lost: found again or ended at the camera's rate
            or (tracks.seen & (now - tracks.moved_at < config.stationary_after_s)).any()  # moving tracks
            or (len(tracks.untracked) and self.quiet <= TENTATIVE_FRAMES)  # detections being confirmed
            or (live and self.last_through is not None and now - self.last_through >= config.stationary_interval_s)
        )
        regions = None
        if through and config.detect == "regions":
            regions = self._regions(moved.boxes, frame.size)
        frame.motion = Motion(moved.fraction, moved.boxes, regions, config.full_above, gated=not through)
        if through:
            counts.detected += 1
            self.last_through = now
        else:
            counts.gated += 1
            if self.last_detections is not None:
                frame.detections = self.last_detections
        return through

    def _regions(self, moved: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Where the detector looks: what moved, every track followed (a lost one with room to have moved) and
        detections being confirmed, each padded, clipped to the frame."""
        tracks, pad = self.tracks, self.config.padding
        box = tracks.box
        lost = ~tracks.seen
        if lost.any():  # room for where it went: half its size again on every side
            half = (box[:, 2:] - box[:, :2]) * 0.5
            box = box.copy()
            box[lost] += np.concatenate([-half[lost], half[lost]], axis=1)
        regions = np.concatenate([moved, box, tracks.untracked]).astype(np.float32)
        regions += np.array([-pad, -pad, pad, pad], np.float32)
        width, height = size
        return np.clip(regions, 0, np.array([width, height, width, height], np.float32))

    def observe(self, frame: Frame) -> None:
        """`frame` went through the chain: its tracks (ids, boxes, ended) and what the detector did."""
        detections, tracks, now = frame.detections, self.tracks, frame.ts_mono
        if frame.motion is not None:
            self.counts.crops += frame.motion.crops
        self.last_detections = detections
        ids = detections.tracker_id
        tracked = ids != NO_TRACK
        now_ids, now_boxes = ids[tracked], detections.xyxy[tracked]
        order = np.argsort(now_ids, kind="stable")
        now_ids, now_boxes = now_ids[order], now_boxes[order]
        ended = frame.tracks.ended.track_id if frame.tracks is not None else np.zeros(0, np.int64)
        kept = ~np.isin(tracks.ids, ended) & ~np.isin(tracks.ids, now_ids) & (tracks.unseen < LOST_FRAMES)
        fresh = ~np.isin(now_ids, tracks.ids)
        # the tracks seen now: moved (or new) ones get a new anchor
        at = np.searchsorted(tracks.ids, now_ids)
        at_known = np.minimum(at, max(len(tracks.ids) - 1, 0))
        anchor = np.where(fresh[:, None], now_boxes, tracks.anchor[at_known] if len(tracks.ids) else now_boxes)
        moved_at = np.where(fresh, now, tracks.moved_at[at_known] if len(tracks.ids) else now)
        still = _iou(anchor, now_boxes) >= STILL_IOU
        anchor = np.where(still[:, None], anchor, now_boxes)
        moved_at = np.where(still, moved_at, now)
        ids_all = np.concatenate([tracks.ids[kept], now_ids])
        order = np.argsort(ids_all, kind="stable")
        self.tracks = _Tracks(
            ids_all[order],
            np.concatenate([tracks.box[kept], now_boxes])[order],
            np.concatenate([tracks.anchor[kept], anchor])[order].astype(np.float32),
            np.concatenate([tracks.moved_at[kept], moved_at])[order],
            np.concatenate([np.zeros(int(kept.sum()), bool), np.ones(len(now_ids), bool)])[order],
            np.concatenate([tracks.unseen[kept] + 1, np.zeros(len(now_ids), np.int64)])[order],
            detections.xyxy[~tracked],
        )

    def forget_tracks(self) -> None:
        """The camera went down: its tracks ended, its background is stale."""
        self.tracks = _Tracks()
        self.motion.reset()
        self.last_through = None
        self.last_detections = None
        self.quiet = 0


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row IoU of two (N, 4) xyxy arrays."""
    lo = np.maximum(a[:, :2], b[:, :2])
    hi = np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


class MotionGate:
    """The gates of the cameras with `motion:`; the scheduler asks it about every frame (its thread only)."""

    def __init__(self, settings: Mapping[str, MotionConfig] | None = None):
        self.cameras: dict[str, CameraGate] = {}
        self._logged: dict[str, float] = {}
        self.configure(settings or {})

    def configure(self, settings: Mapping[str, MotionConfig]) -> None:
        """The cameras' motion settings (a new configuration): a camera whose settings changed starts afresh."""
        for name in list(self.cameras):
            if name not in settings or settings[name] != self.cameras[name].config:
                del self.cameras[name]
        for name, config in settings.items():
            if name not in self.cameras:
                self.cameras[name] = CameraGate(config)

    def select(self, frames: list[Frame]) -> list[Frame]:
        """The frames that go through the chain; the others are gated (counted, `frame.motion.gated`)."""
        if not self.cameras:
            return frames
        return [frame for frame in frames if self._decide(frame)]

    def _decide(self, frame: Frame) -> bool:
        gate = self.cameras.get(frame.camera)
        if gate is None:
            return True
        try:
            return gate.decide(frame)
        except Exception:  # a bug here must not stop the scheduler: the frame goes through, as without gating
            self._failed(frame.camera, "deciding on")
            return True

    def observe(self, frames: Iterable[Frame]) -> None:
        """Frames that went through the chain."""
        if self.cameras:
            for frame in frames:
                gate = self.cameras.get(frame.camera)
                if gate is None:
                    continue
                try:
                    gate.observe(frame)
                except Exception:
                    self._failed(frame.camera, "learning the tracks of")
                    gate.forget_tracks()

    def _failed(self, camera: str, doing: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(camera, -FAILURE_LOG_S) >= FAILURE_LOG_S:
            self._logged[camera] = now
            log.exception("camera %s: the motion gate failed %s a frame (it goes through)", camera, doing)

    def camera_down(self, camera: str) -> None:
        """`camera` went down, or a reload replaced a plugin instance serving it (its tracks ended with it): the gate
        forgets its tracks and background; its next frame goes through as the tracker's first."""
        gate = self.cameras.get(camera)
        if gate is not None:
            gate.forget_tracks()

    def checked(self, notice: Notice) -> Notice:
        """A camera's `up` notice, with `warnings` about its motion masks on the frame size it reports (logged)."""
        gate = self.cameras.get(notice.camera)
        width, height = notice.detail.get("width"), notice.detail.get("height")
        if gate is None or not isinstance(width, int) or not isinstance(height, int):
            return notice
        warnings = mask_warnings(gate.config, width, height)
        if not warnings:
            return notice
        for warning in warnings:
            log.warning("camera %s: %s", notice.camera, warning)
        return dataclasses.replace(notice, detail={**notice.detail, "warnings": warnings})

    def counts(self) -> dict[str, dict[str, float | int]]:
        return {name: gate.counts.snapshot() for name, gate in list(self.cameras.items())}
