"""Action recognition with 3D CNNs and video transformers: what each tracked object is doing, over time.

Each track of the configured classes gets a tube (plugins/actions/tubes.py): crops around its box, cut on the
device every `stride` frames. Once a tube holds `clip_len` crops, it is classified every `interval` new crops;
the clips of every track and camera of a batch go through the model together. Scores are smoothed over
consecutive clips; `action.start` when a label stays at or above its threshold for `min_clips` clips,
`action.end` when it falls below the threshold minus `hysteresis` (or the track ends). The current top actions of
the detections due a `track.update` go in their `data` (`actions`, `action_scores`), and from there on the event.
`mode: frame` classifies each camera's whole view instead.

Placed beside the chain (`placement: thread`, the default, or `process`), the tubes are cut in the chain as above,
and the clips due are classified beside it, on a worker of the plugin's own (plugins/actions/classifier.py): the
chain never waits for the model, the worker skips the oldest clips it cannot afford, and its events reach
subscribers a little later than the frame's other events, with that frame's index and time. With `process` the
model runs in a process of its own (the clips go there, their scores come back; vigild.pipeline.branch_process),
so its Python never holds the chain's interpreter. With `placement: chain` the chain classifies them itself.
With `half`, the model runs under autocast in float16 (CUDA) or bfloat16 (CPU); its weights, the clips'
normalisation and the crop boxes stay float32, and the start-up probe runs in that same precision.

In `mode: tracks` the plugin must come after a tracker in the chain (it reads `tracker_id` and `frame.tracks`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import ClassVar

import numpy as np
import torch

from vigild.events import Event
from vigild.frame import TRACK_UPDATE_FIELDS, Detections, Frame
from vigild.pipeline.branch import CLOSE_WAIT_S, branch_share
from vigild.pipeline.branch_process import ProcessPlugin
from vigild.plugin import BranchWork, FrameErrors, Plugin, PluginConfig, PluginConfigError
from vigild.plugins.actions.classifier import Clips, ClipWorker, Release
from vigild.plugins.actions.config import ActionRecognizerConfig
from vigild.plugins.actions.scoring import ActionScores, ScoreRules
from vigild.plugins.actions.tubes import CameraTubes, LastSightings, TubeCutter, TubePool, square_boxes
from vigild.plugins.actions.video_models import (
    ClipRunner,
    ClipSettings,
    VideoModel,
    VideoModelError,
    check_clip,
    load_video_model,
)
from vigild.vision.device import OomSplitter, default_half, half_dtype


@dataclass
class _Due:
    """The tubes of one frame of a batch whose clips are due, and what they were before (undone if the model
    fails)."""

    position: int
    slots: np.ndarray
    rows: np.ndarray
    clips: torch.Tensor
    classified_at: np.ndarray
    generation: np.ndarray


class ActionRecognizer(Plugin[ActionRecognizerConfig]):
    Config = ActionRecognizerConfig
    provides: ClassVar[frozenset[str]] = frozenset({"actions"})
    batched = True  # tubes are per track; a frame that fails is named with FrameErrors, never run twice
    placements = ("thread", "process", "chain")  # where clips are classified (measured: docs/actions.md)
    keeps_order = True  # tubes are cut in the chain, on every frame, in order

    @classmethod
    def requirements(cls, config: PluginConfig) -> frozenset[str]:
        tracks = isinstance(config, ActionRecognizerConfig) and config.mode == "tracks"
        return frozenset({"tracks"}) if tracks else frozenset()

    def start(self) -> None:
        c = self.config
        video = self._load_model()
        labels = video.labels
        for key, names in (("actions", c.actions), ("thresholds", list(c.thresholds))):
            unknown = [name for name in names if name not in labels]
            if unknown:
                # labels from a file are that file's content: named by count only, whatever file it is
                has = f"its labels file {c.labels} has {len(labels)}" if c.labels else f"it has {', '.join(labels[:20])}"
                raise PluginConfigError(key, f"the model has no label {unknown[0]!r}; {has}")
        interest = np.array([labels.index(a) for a in c.actions] if c.actions else range(len(labels)), np.int64)
        start_at = np.array([c.thresholds.get(labels[i], c.threshold) for i in interest], np.float32)
        rules = ScoreRules(tuple(labels), interest, start_at, start_at - c.hysteresis, c.smoothing, c.min_clips)
        self.scores = ActionScores(c.max_tracks, rules)
        self.cutter = TubeCutter(video.size, self.device)
        self.pool = TubePool(c.max_tracks, video.clip_len, video.size, self.device)
        n = c.max_tracks
        self.classified_at = np.zeros(n, np.int64)
        self.generation = np.zeros(n, np.int64)  # counts the tracks a slot has served
        self.last_sample = np.zeros(n, np.int64)
        self.track_of = np.zeros(n, np.int64)  # the track id a slot serves (slots are per camera)
        self.last_seen = LastSightings(n)  # the detection each track was last cut from
        self._cameras: dict[str, CameraTubes] = {}
        self.tubes_refused = 0
        self._wanted_classes: dict[tuple[str, ...], np.ndarray] = {}
        self.worker: ClipWorker | None = None
        self.remote: ProcessPlugin | None = None
        if self.context.placement != "chain":
            classify = self.classify
            if self.context.placement == "process":  # the model in a process of its own; scores come back
                self.remote = ProcessPlugin(ClipClassifier, c.id or c.type, c, replace(self.context, placement="chain"))
                self.remote.start()
                classify = partial(_classify_remote, self.remote)
            share = branch_share(c.branch_share, self.context.device)
            self.worker = ClipWorker(c.id or c.type, classify, self.scores, self.context.publish,
                                     c.backlog or c.max_batch, c.max_batch, self.context.torch_threads,
                                     share, partial(getattr, self.remote, "pid") if self.remote else None)  # fmt: skip
            self.worker.start()
        where = {"thread": ", classifying beside the chain", "process": ", classifying in a process of its own"}
        self.log.info(
            "%s (%d labels, clips %dx%dx%d) on %s, %s%s", c.model, len(labels), video.clip_len, video.size,
            video.size, self.device, self.run.precision, where.get(self.context.placement, ""),
        )  # fmt: skip

    def _load_model(self) -> VideoModel:
        """The video model on the device, checked with a clip of its size in the precision of every later batch."""
        c = self.config
        self.device = torch.device(self.context.device)
        half = c.half if c.half is not None else default_half(self.context.device)
        try:
            video = load_video_model(c.model, c.weights, c.labels, ClipSettings(c.clip_len, c.size, c.mean, c.std))
            self.run = ClipRunner(video, self.device, half_dtype(self.device) if half else None)
            check_clip(video, self.run)  # on the device, in the precision (and autocast) of every later batch
        except VideoModelError as exc:
            raise PluginConfigError(exc.key, str(exc)) from exc
        self.video: VideoModel = video
        self.splitter = OomSplitter(f"action_recognizer {c.model}", self.context.device)
        return video

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.remote is not None:
            self.remote.stop()

    def branch_work(self) -> BranchWork | None:
        return getattr(self, "worker", None)  # (none before start: the status may be read while a change loads it)

    # ---- per batch

    def process(self, frames: list[Frame]) -> None:
        """Cut every frame's crops into the tubes, then classify the clips now due of the whole batch at once.

        A frame whose tubes cannot be cut is named in `FrameErrors` and the others go on. When the model fails, the
        frames with clips due are named (the crops stay: each frame is cut once) and those tubes are not marked as
        classified, so they are classified at their next crop. The chain never runs this plugin twice on a frame.
        As a branch, the clips due go to the worker instead, and their events are its to publish."""
        errors: dict[int, Exception] = {}
        due: list[_Due] = []
        for position, frame in enumerate(frames):
            try:
                frame.events.extend(self._close_ended(frame))
                slots, rows = self._sample(frame)
            except Exception as exc:
                errors[position] = exc
                continue
            if len(slots):
                ready = (self.pool.written[slots] >= self.pool.clip_len) & (
                    self.pool.written[slots] - self.classified_at[slots] >= self.config.interval
                )
                slots, rows = slots[ready], rows[ready]
                if len(slots):
                    before = self.classified_at[slots].copy()
                    # the clip as of this frame (a copy): later frames write over its oldest crops
                    due.append(
                        _Due(position, slots, rows, self.pool.clips(slots), before, self.generation[slots].copy())
                    )
                    self.classified_at[slots] = self.pool.written[slots]  # later frames of the batch see it
        if due and self.worker is not None:
            for d in due:
                frame = frames[d.position]
                objects = frame.detections[d.rows] if self.config.mode == "tracks" else None
                self.worker.put_clips(Clips(frame.camera, frame.ts_wall, frame.index, d.slots, d.generation,
                                            objects, d.clips))  # fmt: skip
            due = []
        if due:
            try:
                scores = self.classify(torch.cat([d.clips for d in due]))
            except Exception as exc:
                for d in reversed(due):  # as before this batch, for the tubes still serving the same track
                    same = self.generation[d.slots] == d.generation
                    self.classified_at[d.slots[same]] = d.classified_at[same]
                    errors[d.position] = exc
            else:
                start = 0
                for d in due:
                    frame = frames[d.position]
                    objects = frame.detections[d.rows] if self.config.mode == "tracks" else None
                    part = scores[start : start + len(d.slots)]
                    frame.events.extend(
                        self.scores.score(frame.camera, frame.ts_wall, frame.index, d.slots, d.generation, objects, part)
                    )
                    start += len(d.slots)
        for frame in frames:
            self._add_top_actions(frame)
        if errors:
            raise FrameErrors(dict(sorted(errors.items())))

    def classify(self, clips: torch.Tensor) -> np.ndarray:
        """(K, 3, T, S, S) uint8 clips on the device -> (K, labels) softmax scores, in batches of `max_batch`."""
        pieces = [clips[i : i + self.config.max_batch] for i in range(0, len(clips), self.config.max_batch)]
        out = [self.splitter(self._forward, list(piece)) for piece in pieces]
        return np.concatenate([np.stack(part) for part in out]) if out else np.zeros((0, len(self.video.labels)))

    def _forward(self, clips: Sequence[torch.Tensor]) -> list[np.ndarray]:
        return list(torch.softmax(self.run(torch.stack(list(clips))), dim=1).cpu().numpy())

    # ---- tubes

    def _sample(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        """Cut this frame's crops into the tubes of its tracks (every `stride` frames): (slots, detection index)."""
        camera = self._cameras.setdefault(frame.camera, CameraTubes())
        sampled = camera.samples % self.config.stride == 0
        camera.samples += 1
        if not sampled:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        width, height = frame.size
        if self.config.mode == "frame":
            side = min(width, height)
            boxes = np.array([[(width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2]])
            ids, rows = np.zeros(1, np.int64), np.full(1, -1, np.int64)
            squares = boxes.astype(np.float32)
        else:
            detections = frame.detections
            wanted = (detections.tracker_id >= 0) & self._class_mask(detections)[detections.class_id]
            rows = np.flatnonzero(wanted)
            ids = detections.tracker_id[rows]
            squares = square_boxes(detections.xyxy[rows], self.config.margin, width, height)
        crops = self.cutter(frame.image, squares)  # before any tube changes: a failure here leaves them as they were
        slots, known = self._slots_for(camera, ids)
        rows = rows[known]
        self.pool.write(slots, crops[torch.from_numpy(known).to(crops.device)] if not known.all() else crops)
        self.last_sample[slots] = camera.samples
        if self.config.mode == "tracks":
            self.last_seen.put(slots, frame.detections, rows)
        return slots, rows

    def _class_mask(self, detections: Detections) -> np.ndarray:
        mask = self._wanted_classes.get(detections.class_names)
        if mask is None:
            mask = np.array([name in self.config.classes for name in detections.class_names] + [False], bool)
            self._wanted_classes[detections.class_names] = mask
        return mask

    def _slots_for(self, camera: CameraTubes, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Slots of these track ids, taking free ones for new tracks: (slots, mask of ids that have one)."""
        slots = camera.slots_of(ids)
        new = np.flatnonzero(slots < 0)
        if len(new):
            taken = self.pool.take(len(new))
            self.tubes_refused += len(new) - len(taken)
            new = new[: len(taken)]
            slots[new] = taken
            self._reset(taken)
            self.track_of[taken] = ids[new]
            merged_ids = np.concatenate([camera.track_ids, ids[new]])
            merged_slots = np.concatenate([camera.slots, taken])
            order = np.argsort(merged_ids, kind="stable")
            camera.track_ids, camera.slots = merged_ids[order], merged_slots[order]
        has = slots >= 0
        return slots[has], has

    def _reset(self, slots: np.ndarray) -> None:
        """Slots taken by new tracks: a new generation (the scores start afresh with it)."""
        self.generation[slots] += 1
        self.classified_at[slots] = 0

    def _release(
        self, camera_name: str, track_ids: np.ndarray, ts: float, frame_index: int, reason: str, wait_s: float = 0.0
    ) -> list[Event]:
        """Free the tubes of these tracks: their `action.end` events (as a branch, the worker publishes them, after
        the clips queued before; `wait_s`: how long to wait for that)."""
        camera = self._cameras.get(camera_name)
        if camera is None or not len(track_ids) or not len(camera.track_ids):
            return []
        gone = np.isin(camera.track_ids, track_ids)
        slots = camera.slots[gone]
        tracks = self.config.mode == "tracks"
        sightings = [
            self.last_seen.get(int(slot), int(self.track_of[slot])) if tracks and self.last_seen.held[slot] else None
            for slot in slots
        ]  # one per track that ended: its last detection, for the action.end events it may get
        generations = self.generation[slots].copy()
        camera.track_ids, camera.slots = camera.track_ids[~gone], camera.slots[~gone]
        self.last_seen.drop(slots)
        self.pool.give_back(slots)
        if self.worker is not None:
            item = Release(camera_name, ts, frame_index, slots, generations, reason, sightings, wait_s > 0)
            self.worker.release(item, wait_s)
            return []
        return self.scores.release(camera_name, ts, frame_index, slots, generations, reason, sightings)

    def _close_ended(self, frame: Frame) -> list[Event]:
        """Tubes of tracks the tracker ended on this frame, and of tracks not seen for long, are freed."""
        ended = frame.tracks.ended.track_id if frame.tracks is not None else np.zeros(0, np.int64)
        events = self._release(frame.camera, ended, frame.ts_wall, frame.index, "track_end")
        camera = self._cameras.get(frame.camera)
        if camera is not None and len(camera.slots) and self.config.mode == "tracks":
            patience = 4 * self.pool.clip_len * self.config.stride + 30
            stale = camera.samples - self.last_sample[camera.slots] > patience
            if stale.any():
                events += self._release(frame.camera, camera.track_ids[stale], frame.ts_wall, frame.index, "lost")
        return events

    # ---- scores and events

    def _add_top_actions(self, frame: Frame) -> None:
        """The current top actions of the tracks due a `track.update` (`frame.tracks.updated`), as the detections'
        `actions` (labels, None where a track has no scores yet) and `action_scores` (NaN there)."""
        camera = self._cameras.get(frame.camera)
        if not self.config.top_k or camera is None or not len(camera.track_ids) or frame.tracks is None:
            return
        detections, rows = frame.detections, frame.tracks.updated
        slots = camera.slots_of(detections.tracker_id[rows])
        rows, slots = rows[slots >= 0], slots[slots >= 0]
        has, top_labels, top_scores = self.scores.top(slots, self.generation[slots], self.config.top_k)
        labels = np.full((len(detections), top_labels.shape[1]), None, object)
        scores = np.full(labels.shape, np.nan, np.float32)
        labels[rows[has]], scores[rows[has]] = top_labels, top_scores
        # on the track.update events: per track that has scores, its top actions (one dict per object updated)
        fields = np.full(len(detections), None, object)
        for row, names, values in zip(rows[has].tolist(), top_labels.tolist(), top_scores.tolist(), strict=True):
            if values and not math.isnan(values[0]):
                fields[row] = {"actions": [{"action": str(n), "score": round(v, 4)} for n, v in zip(names, values, strict=True)]}
        frame.detections = detections.with_data(actions=labels, action_scores=scores, **{TRACK_UPDATE_FIELDS: fields})

    def on_source_end(self, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        state = self._cameras.get(camera)
        if state is None:
            return []
        events = self._release(camera, state.track_ids.copy(), ts_wall, frame_index, "source_end", CLOSE_WAIT_S)
        self._cameras.pop(camera, None)
        return events


class ClipClassifier(ActionRecognizer):
    """The action recognizer's model alone, in its process (`placement: process`, vigild.pipeline.branch_process):
    the daemon's recognizer cuts the tubes and scores; this only classifies the clips it is sent (`classify`)."""

    def start(self) -> None:
        self._load_model()

    def stop(self) -> None:
        pass

    def process(self, frames: list[Frame]) -> None:
        raise RuntimeError("the clip classifier classifies clips, not frames")

    def classify_array(self, clips: np.ndarray) -> np.ndarray:
        """`classify` of clips sent as an array: a tensor would cross as a handle to shared memory, which torch's
        sharing reaches through the daemon's multiprocessing listener (this process is not its child)."""
        return self.classify(torch.from_numpy(clips).to(self.device))


def _classify_remote(remote: ProcessPlugin, clips: torch.Tensor) -> np.ndarray:
    """Clips classified in the model's process: its scores, or what it raised (a process that died raises
    `ChildDied`, and the next batch starts a new one)."""
    scores, raised = remote.call("classify_array", clips.cpu().numpy())
    if raised is not None:
        raise raised
    return np.asarray(scores)
