"""Tracker cost per frame: vigild's `bytetrack` and `botsort` plugins against ultralytics' BYTETracker and BOTSORT.

Side by side in one run, on synthetic detections (boxes drifting at constant speed with a little noise, so every
tracker follows the same objects): CPU time per frame for 10, 30 and 100 objects per frame, and for batches of 1,
16 and 64 cameras. ultralytics runs one tracker per camera, frame by frame; vigild's plugins take the batch (one
frame of each camera, as the scheduler hands them over) in one vectorised step, and include what they add around
the association: per-camera ids and track events.

    python bench/trackers.py [--frames 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ultralytics_view import UltralyticsView

from vigild.config.loading import CameraConfig
from vigild.events import add_track_events
from vigild.frame import Detections, Frame
from vigild.plugin import PluginContext
from vigild.plugins.tracking.botsort import BotSort, BotSortConfig
from vigild.plugins.tracking.bytetrack import ByteTrack, ByteTrackConfig

IMAGE = np.zeros((8, 8, 3), np.uint8)


def scene(objects: int, frames: int, seed: int) -> list[Detections]:
    rng = np.random.default_rng(seed)
    start = rng.uniform(0, 1800, (objects, 2)).astype(np.float32)
    velocity = rng.uniform(-4, 4, (objects, 2)).astype(np.float32)
    out = []
    for i in range(frames):
        corner = start + velocity * i + rng.normal(0, 1.0, (objects, 2)).astype(np.float32)
        xyxy = np.concatenate([corner, corner + 60], axis=1)
        out.append(Detections.untracked(xyxy, np.full(objects, 0.8, np.float32), np.zeros(objects, np.int32), ("p",)))
    return out


def vigild_ms(kind: str, objects: int, cameras: int, frames: int) -> float:
    names = [f"c{i}" for i in range(cameras)]
    context = PluginContext("cpu", {n: CameraConfig(source=n) for n in names})
    plugin = ByteTrack(ByteTrackConfig(), context) if kind == "bytetrack" else BotSort(BotSortConfig(), context)
    plugin.start()
    scenes = [scene(objects, frames, seed) for seed in range(cameras)]
    began = time.process_time()
    for i in range(frames):
        batch = [Frame(n, i, time.time(), time.monotonic(), IMAGE, detections=scenes[c][i]) for c, n in enumerate(names)]
        plugin.process(batch)
        for frame in batch:  # the track events, as the chain makes them after its last plugin
            add_track_events(frame)
    return (time.process_time() - began) / (frames * cameras) * 1000


def ultralytics_ms(kind: str, objects: int, cameras: int, frames: int) -> float:
    from argparse import Namespace

    from ultralytics.trackers.bot_sort import BOTSORT
    from ultralytics.trackers.byte_tracker import BYTETracker

    args = Namespace(track_high_thresh=0.25, track_low_thresh=0.1, new_track_thresh=0.25, track_buffer=30,
                     match_thresh=0.8, fuse_score=True, gmc_method=None, proximity_thresh=0.5,
                     appearance_thresh=0.8, with_reid=False, model="auto")  # fmt: skip
    trackers = [BYTETracker(args) if kind == "bytetrack" else BOTSORT(args) for _ in range(cameras)]
    scenes = [scene(objects, frames, seed) for seed in range(cameras)]
    began = time.process_time()
    for i in range(frames):
        for c, tracker in enumerate(trackers):
            tracker.update(UltralyticsView(scenes[c][i]))
    return (time.process_time() - began) / (frames * cameras) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300, help="camera-frames per cell, at least 20 per camera")
    args = parser.parse_args()
    print("ms CPU per frame; speed-up = ultralytics / vigild")
    print(f"{'objects':>7} {'cameras':>7} | {'ultralytics BYTETracker':>22} {'vigild bytetrack':>16} {'speed-up':>8}"
          f" | {'ultralytics BOTSORT':>19} {'vigild botsort':>14} {'speed-up':>8}")  # fmt: skip
    for objects in (10, 30, 100):
        for cameras in (1, 16, 64):
            frames = max(20, args.frames // cameras)
            base = ultralytics_ms("bytetrack", objects, cameras, frames)
            ours = vigild_ms("bytetrack", objects, cameras, frames)
            bot_base = ultralytics_ms("botsort", objects, cameras, frames)
            bot = vigild_ms("botsort", objects, cameras, frames)
            print(f"{objects:>7} {cameras:>7} | {base:>22.3f} {ours:>16.3f} {base / ours:>7.1f}x"
                  f" | {bot_base:>19.3f} {bot:>14.3f} {bot_base / bot:>7.1f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
