"""Test media for motion gating, made from the real plaza footage (../shared/media/vtest.avi) when asked:

- `plate`: the plaza with nobody in it (the median of the footage's frames: every walker moves on);
- `quiet_scene`: the empty plaza, with the real footage cut in for `move_s` of every `cycle_s` (walkers appear with
  it and vanish when it ends), starting `phase_s` into the cycle: a camera that sees something a fifth of the time;
- `frozen_scene`: the real footage, frozen (its last frame held) for `freeze_s` after every `move_s`: people who
  stand still;
- `lights_scene`: the empty plaza whose light changes in steps and which shakes now and then, with walkers cut in
  for a stretch: global change that must not keep the detector running;
- `distant_scene`: the whole plaza scaled down into a corner of a 1280x720 view of itself: walkers about 45 px
  tall, which the whole frame letterboxed to 320 loses and a 320 crop at full resolution keeps.
Frames are BGR arrays at the footage's 10 frames/s; `write_h264` encodes them (x264, GStreamer) for a camera.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from vigild.events import Event

MEDIA = Path(os.environ.get("VIGILD_SHARED", Path(__file__).resolve().parents[1].parent / "shared")).resolve() / "media"
FPS = 10


@functools.lru_cache(maxsize=4)
def footage(size: tuple[int, int] = (640, 360)) -> tuple[np.ndarray, ...]:
    """Every frame of vtest.avi, scaled to `size` (read-only arrays)."""
    capture = cv2.VideoCapture(str(MEDIA / "vtest.avi"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        frame.flags.writeable = False
        frames.append(frame)
    capture.release()
    assert frames, f"cannot read {MEDIA / 'vtest.avi'}"
    return tuple(frames)


@functools.lru_cache(maxsize=4)
def plate(size: tuple[int, int] = (640, 360)) -> np.ndarray:
    """The plaza with nobody in it: the per-pixel median of every 4th frame."""
    median = np.median(np.stack(footage(size)[::4]), axis=0).astype(np.uint8)
    median.flags.writeable = False
    return median


def quiet_scene(seconds: float, cycle_s: float = 20.0, move_s: float = 4.0, phase_s: float = 0.0,
                size: tuple[int, int] = (640, 360)) -> list[np.ndarray]:  # fmt: skip
    """`seconds` of the empty plaza with the real footage cut in for `move_s` of every `cycle_s`, from `phase_s`
    into the cycle; each stretch of footage goes on where the last one stopped."""
    real, empty = footage(size), plate(size)
    frames: list[np.ndarray] = []
    at = 0
    for i in range(round(seconds * FPS)):
        t = (i / FPS + phase_s) % cycle_s
        if t < move_s:
            frames.append(real[at % len(real)])
            at += 1
        else:
            frames.append(empty)
    return frames


def moving_spans(seconds: float, cycle_s: float = 20.0, move_s: float = 4.0, phase_s: float = 0.0) -> np.ndarray:
    """Per frame of `quiet_scene(...)`: whether it shows the footage."""
    t = (np.arange(round(seconds * FPS)) / FPS + phase_s) % cycle_s
    return t < move_s


def frozen_scene(move_s: float, freeze_s: float, rounds: int, start: int = 0,
                 size: tuple[int, int] = (640, 360)) -> list[np.ndarray]:  # fmt: skip
    """The footage from frame `start`: `move_s` of it, then its last frame held for `freeze_s`, `rounds` times."""
    real = footage(size)
    frames: list[np.ndarray] = []
    at = start
    for _ in range(rounds):
        frames.extend(real[at : at + round(move_s * FPS)])
        at += round(move_s * FPS)
        frames.extend([real[at - 1]] * round(freeze_s * FPS))
    return frames


def lights_scene(seconds: float, size: tuple[int, int] = (640, 360)) -> tuple[list[np.ndarray], np.ndarray]:
    """The empty plaza whose brightness steps every 3 s (lights switched), that shakes (shifted by 6 px, back and
    forth) for 1 s every 7 s, with the footage cut in for 4 s at 10 s. Returns the frames and, per frame, whether
    it shows walkers."""
    real, empty = footage(size), plate(size)
    width, height = size
    frames, walkers = [], []
    for i in range(round(seconds * FPS)):
        t = i / FPS
        walking = 10.0 <= t < 14.0
        base = real[i] if walking else empty
        gain = (0.55, 1.0, 1.35)[int(t // 3) % 3]
        frame = cv2.convertScaleAbs(base, alpha=gain)
        if t % 7 < 1.0:
            dx = 6 if i % 2 else -6
            frame = cv2.warpAffine(frame, np.float32([[1, 0, dx], [0, 1, dx // 2]]), (width, height),
                                   borderMode=cv2.BORDER_REFLECT)  # fmt: skip
        frames.append(frame)
        walkers.append(walking)
    return frames, np.array(walkers)


DISTANT_AT = (880, 420)
"""Where the scaled-down plaza sits in the 1280x720 view (its top-left corner)."""
DISTANT_SIDE = 320
"""Its width in the view (the height keeps the footage's 4:3)."""


def distant_scene(frames: int, size: tuple[int, int] = (1280, 720)) -> list[np.ndarray]:
    """A 1280x720 view: the empty plaza scaled up and blurred (far, out of focus) with the whole footage scaled down
    to `DISTANT_SIDE` wide at `DISTANT_AT` (walkers about 45 px tall)."""
    background = cv2.GaussianBlur(cv2.resize(plate((768, 576)), size), (31, 31), 0)
    x0, y0 = DISTANT_AT
    side, height = DISTANT_SIDE, DISTANT_SIDE * 3 // 4
    views = []
    for frame in footage((side, height))[:frames]:
        view = background.copy()
        view[y0 : y0 + height, x0 : x0 + side] = frame
        views.append(view)
    return views


def to_distant(xyxy: np.ndarray, from_size: tuple[int, int]) -> np.ndarray:
    """Boxes in frames of `from_size` of the footage → where they are in `distant_scene`'s view."""
    x0, y0 = DISTANT_AT
    side, height = DISTANT_SIDE, DISTANT_SIDE * 3 // 4
    scale = np.array([side / from_size[0], height / from_size[1]] * 2, np.float32)
    return xyxy * scale + np.array([x0, y0, x0, y0], np.float32)


def write_h264(frames: list[np.ndarray], out: Path, fps: int = FPS, key_int: int = 20) -> Path:
    """Encode BGR `frames` to an MP4 (x264, GStreamer) with a keyframe every `key_int` frames."""
    height, width = frames[0].shape[:2]
    pipeline = (f"fdsrc fd=0 ! rawvideoparse format=bgr width={width} height={height} framerate={fps}/1 ! "
                f"videoconvert ! video/x-raw,format=I420 ! x264enc speed-preset=veryfast key-int-max={key_int} "
                f"bitrate=1500 ! h264parse ! mp4mux ! filesink location={out}")  # fmt: skip
    process = subprocess.Popen(["gst-launch-1.0", "-q", "-e", *pipeline.split()], stdin=subprocess.PIPE)
    assert process.stdin is not None
    for frame in frames:
        process.stdin.write(np.ascontiguousarray(frame).tobytes())
    process.stdin.close()
    if process.wait(timeout=600) != 0:
        raise RuntimeError(f"gst-launch failed to encode {out}")
    return out


@dataclass
class Run:
    """What the chain made of a scene, as the scheduler runs it (gate, chain, gate): every track's box on every
    frame (a gated frame keeps the boxes of the last detected one, as the daemon shows it), the events, the
    gate's counts."""

    boxes: dict[int, dict[int, np.ndarray]]
    """track id → frame number → xyxy."""
    events: list[tuple[int, Event]]
    """(frame number, event)."""
    counts: dict[str, float | int]
    detected: list[int]
    """Frame numbers that went through the chain."""

    def firsts(self) -> dict[int, int]:
        """track id → the frame of its `track.new`."""
        return {int(event.object["track_id"]): k for k, event in self.events if event.type == "track.new" and event.object}


def through_chain(images: list[np.ndarray], plugins_yaml: str, motion: dict[str, Any] | None,
                  work: Path, fps: float = 5.0) -> Run:  # fmt: skip
    """`images` (one camera, `fps` apart) through the chain of `plugins_yaml` (a config's `plugins:` list) behind
    the motion gate with `motion` (None: ungated), on this thread, in the scheduler's order."""
    from vigild.config.loading import load_config
    from vigild.frame import NO_TRACK, Frame
    from vigild.pipeline.chain import Chain
    from vigild.pipeline.gate import MotionGate

    motion_yaml = f"motion: {json.dumps(motion)}\n" if motion is not None else ""
    config_file = work / f"chain-{time.monotonic_ns()}.yaml"
    config_file.write_text(f"cameras:\n  a: {{source: test://ball, fps: {fps}}}\n{motion_yaml}plugins:\n{plugins_yaml}\n")
    config = load_config(config_file)
    chain = Chain(config.chain, "cpu", config.cameras)
    chain.start()
    gate = MotionGate(config.settings.motion_by_camera())
    boxes: dict[int, dict[int, np.ndarray]] = {}
    events: list[tuple[int, Event]] = []
    detected: list[int] = []
    try:
        for k, image in enumerate(images):
            frame = Frame("a", k, 1_000_000.0 + k / fps, 1000.0 + k / fps, image)
            through = gate.select([frame])
            if through:
                chain.process(through)
                gate.observe(through)
                detected.append(k)
                events.extend((k, event) for event in frame.events)
            tracked = frame.detections.tracker_id != NO_TRACK
            for track_id, box in zip(frame.detections.tracker_id[tracked], frame.detections.xyxy[tracked], strict=True):
                boxes.setdefault(int(track_id), {})[k] = box
        events.extend((len(images), event) for event in chain.source_ended("a", 1_000_000.0 + len(images) / fps, -1))
    finally:
        chain.stop()
    return Run(boxes, events, gate.counts().get("a", {}), detected)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    lo, hi = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(hi - lo, 0, None)))
    return inter / (float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2])) - inter)


def matched(truth: dict[int, dict[int, np.ndarray]], other: dict[int, dict[int, np.ndarray]],
            threshold: float = 0.5) -> dict[int, int | None]:  # fmt: skip
    """Per track of `truth`: the track of `other` with IoU ≥ `threshold` on the truth track's middle frame (the
    best), or None."""
    found: dict[int, int | None] = {}
    for track_id, seen in truth.items():
        frames = sorted(seen)
        middle = frames[len(frames) // 2]
        best = max(((iou(seen[middle], boxes[middle]), other_id) for other_id, boxes in other.items()
                    if middle in boxes), default=(0.0, None))  # fmt: skip
        found[track_id] = best[1] if best[0] >= threshold else None
    return found
