"""Action recognizer cost: clips/s against batch size, and the added time per frame against live tracks.

Side by side in one run, on this machine's device (`--device`): the plugin with r3d_18 (random weights: speed does
not depend on them) at its own 16x112x112 clips. For each batch size, clips/s of the forward pass alone. For 10,
100 and 500 live tracks on one camera (each track a box moving a little every frame, tubes cut every frame, a
clip classified every `--interval` crops), the plugin's time per frame and the clips it classified per second.

    python bench/actions.py [--device cpu] [--model r3d_18] [--batches 1 4 16] [--tracks 10 100 500]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from vigild.config import CameraConfig
from vigild.frame import Detections, Frame
from vigild.plugin import PluginContext
from vigild.plugins.action_recognizer import ActionRecognizer, ActionRecognizerConfig


def plugin(args: argparse.Namespace, max_tracks: int) -> ActionRecognizer:
    config = ActionRecognizerConfig(
        model=args.model, weights=None, interval=args.interval, max_batch=args.max_batch, max_tracks=max_tracks
    )
    recognizer = ActionRecognizer(config, PluginContext(args.device, {"c": CameraConfig(source="c")}))
    recognizer.start()
    return recognizer


def clips_per_second(recognizer: ActionRecognizer, batch: int, seconds: float) -> float:
    video = recognizer.video
    clips = torch.randint(0, 255, (batch, 3, video.clip_len, video.size, video.size), dtype=torch.uint8)
    clips = clips.to(recognizer.device)
    recognizer.classify(clips)  # warm-up
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        recognizer.classify(clips)
        done += batch
    return done / (time.perf_counter() - began)


def per_frame(recognizer: ActionRecognizer, tracks: int, frames: int) -> tuple[float, float]:
    """(ms per frame, clips classified per second) with `tracks` live tracks on a 1080p camera."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (1080, 1920, 3), dtype=np.uint8)
    corner = rng.uniform(0, 1700, (tracks, 2)).astype(np.float32)
    ids = np.arange(1, tracks + 1)
    began, classified = time.perf_counter(), 0
    for i in range(frames):
        xyxy = np.concatenate([corner + i, corner + i + [60, 160]], axis=1)
        detections = Detections.untracked(xyxy, np.ones(tracks, np.float32), np.zeros(tracks, np.int32), ("person",))
        before = int(recognizer.clips_seen.sum())
        recognizer.process([Frame("c", i, i / 25, i / 25, image, detections=detections.with_tracker_ids(ids))])
        classified += int(recognizer.clips_seen.sum()) - before
    elapsed = time.perf_counter() - began
    return elapsed / frames * 1000, classified / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="r3d_18")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tracks", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--interval", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=40, help="frames per track count (at least clip_len + interval)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per batch size")
    args = parser.parse_args()
    recognizer = plugin(args, max(args.tracks))
    print(f"{args.model} on {args.device}, clips {recognizer.video.clip_len}x{recognizer.video.size}x{recognizer.video.size}")
    print(f"{'batch':>6} {'clips/s':>9}")
    for batch in args.batches:
        print(f"{batch:>6} {clips_per_second(recognizer, batch, args.seconds):>9.1f}", flush=True)
    print(f"{'tracks':>6} {'ms/frame':>9} {'clips/s':>9}   (one camera, tubes cut every frame, a clip every {args.interval} crops)")
    for tracks in args.tracks:
        ms, rate = per_frame(plugin(args, tracks), tracks, args.frames)
        print(f"{tracks:>6} {ms:>9.1f} {rate:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
