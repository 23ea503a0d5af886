"""Action recognizer cost: clips/s against batch size, and the added time per frame against live tracks.

Side by side in one run, on this machine's device (`--device`): the plugin with r3d_18 (random weights: speed does
not depend on them) at its own 16x112x112 clips. For each batch size, clips/s of the forward pass alone. For 10,
100 and 500 live tracks on one camera (each track a box moving a little every frame, tubes cut every frame, a
clip classified every `--interval` crops), the plugin's time per frame and the clips it classified per second.

Then what the plugin costs the daemon (`--pipeline-cameras`, 0 to skip): the real daemon, each run in a fresh
process, on vtest.avi (real pedestrians, looping, read as fast as the chain consumes) with the shared Yolo-Fastest-XL
person detector and ByteTrack, once without the action recognizer, then with it after the tracker, placed as `--modes` says: `thread` (clips classified beside the chain on
a thread), `process` (beside it, the model in a process of its own) and `chain` (classified in the chain): detection fps
and its ratio to the run without, capture-to-publish latency, the clips classified per second and, for the branch,
the clips it skipped per second.

With `--rounds N` the runs alternate (none, then each mode, N times) and a summary gives the medians and their spread.

    python bench/actions.py [--device cpu] [--model r3d_18] [--batches 1 4 16] [--tracks 10 100 500] [--rounds 3]
                            [--pipeline-cameras 1 4] [--seconds-pipeline 30] [--modes thread process chain]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# contenders (bench/) snapshots the environment as the benchmark started (numpy and torch leave it alone)
from contenders import in_fresh_process, start_daemon, thread_counts, vtest_daemon_yaml

from vigild.config.loading import CameraConfig
from vigild.frame import Detections, Frame
from vigild.plugin import PluginContext
from vigild.plugins.actions.action_recognizer import ActionRecognizer, ActionRecognizerConfig


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
        before = int(recognizer.scores.clips_seen.sum())
        recognizer.process([Frame("c", i, i / 25, i / 25, image, detections=detections.with_tracker_ids(ids))])
        classified += int(recognizer.scores.clips_seen.sum()) - before
    elapsed = time.perf_counter() - began
    return elapsed / frames * 1000, classified / elapsed


SHARED = Path(os.environ.get("VIGILD_SHARED", Path(__file__).resolve().parents[2] / "shared")).resolve()


def pipeline_config(cameras: int, mode: str, args: argparse.Namespace) -> str:
    """`mode`: `none` (no recognizer), or its placement: `thread`, `process` or `chain`."""
    recognizer = (
        f"  - type: action_recognizer\n    model: {args.model}\n    weights: null\n    interval: {args.interval}\n"
        f"    max_batch: {args.max_batch}\n    placement: {mode}\n"
        f"    stride: {args.stride}\n" + (f"    branch_share: {args.share}\n" if args.share else "")
        + (f"    half: {'true' if args.half else 'false'}\n" if args.half is not None else "")
    )
    return vtest_daemon_yaml(SHARED, cameras, recognizer if mode != "none" else "", args.device)


def pipeline_run(config: str, warmup: float, seconds: float, results: Any) -> None:
    """One daemon in this (fresh) process; puts its figures over the measured window on `results`."""
    daemon = start_daemon(config)
    recognizers = [p for stage in daemon.chain.stages for p, _ in stage.instances if isinstance(p, ActionRecognizer)]
    clips = [0]
    for recognizer in recognizers:  # count what the model classifies in the chain, without changing what it does
        classify = recognizer.classify

        def counted(batch: torch.Tensor, classify: Any = classify) -> Any:
            clips[0] += len(batch)
            return classify(batch)

        recognizer.classify = counted

    def classified() -> int:  # a branch's worker counts its own (it calls the method it was given at start)
        return clips[0] + sum(r.worker.classified for r in recognizers if r.worker is not None)

    def skipped() -> int:
        return sum(r.worker.skipped_total for r in recognizers if r.worker is not None)

    daemon.start()
    try:
        time.sleep(warmup)
        scheduler = daemon.scheduler
        frames0, clips0, skipped0 = sum(scheduler.processed.values()), classified(), skipped()
        stages0 = {stage.spec.id: (stage.seconds, stage.frames) for stage in daemon.chain.stages}
        scheduler.latencies_s.clear()
        began = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        frames = sum(scheduler.processed.values()) - frames0
        done, skips = classified() - clips0, skipped() - skipped0
        stage_ms = {  # each plugin's time a frame in the chain over the window (where the chain's time goes)
            stage.spec.id: (stage.seconds - stages0[stage.spec.id][0]) * 1000
            / max(1, stage.frames - stages0[stage.spec.id][1])
            for stage in daemon.chain.stages
        }
        latencies = np.array(scheduler.latencies_s) * 1000
        threads = daemon.status()["threads"]
    finally:
        daemon.stop()
    p50, p99 = np.percentile(latencies, [50, 99]) if len(latencies) else (float("nan"), float("nan"))
    results.put(
        {
            "fps": frames / elapsed,
            "p50": float(p50),
            "p99": float(p99),
            "clips_s": done / elapsed,
            "skipped_s": skips / elapsed,
            "threads": threads,
            "stage_ms": stage_ms,
        }
    )


def pipeline(cameras: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    config = pipeline_config(cameras, mode, args)
    result: dict[str, Any] = in_fresh_process(
        pipeline_run, (config, args.warmup, args.seconds_pipeline), args.warmup + args.seconds_pipeline + 600
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="r3d_18")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--tracks", type=int, nargs="*", default=[10, 100, 500])
    parser.add_argument("--interval", type=int, default=8)
    parser.add_argument("--stride", type=int, default=1, help="daemon runs: cut a crop every n-th frame")
    parser.add_argument("--share", type=float, default=None, help="daemon runs: branch_share (default: the plugin's)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--half", type=lambda v: v == "true", default=None, help="daemon runs: `half: true|false`")
    parser.add_argument("--frames", type=int, default=40, help="frames per track count (at least clip_len + interval)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per batch size")
    parser.add_argument("--pipeline-cameras", type=int, nargs="+", default=[1, 4], help="0: no daemon runs")
    parser.add_argument("--seconds-pipeline", type=float, default=30.0, help="measured window per daemon run")
    parser.add_argument("--modes", nargs="+", choices=["thread", "process", "chain"], default=["thread", "process", "chain"])
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the window (loads, clips filling)")
    parser.add_argument("--rounds", type=int, default=1, help="daemon runs: rounds of every mode, alternating")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from vigild.service.threads import apply_threads, choose_threads

    apply_threads(choose_threads(None))  # the plugin alone gets the threads the daemon would give it
    recognizer = plugin(args, max(args.tracks, default=1))
    print(f"{args.model} on {args.device}, clips {recognizer.video.clip_len}x{recognizer.video.size}x{recognizer.video.size}, "
          f"threads {thread_counts()}")
    print(f"{'batch':>6} {'clips/s':>9}")
    for batch in args.batches:
        print(f"{batch:>6} {clips_per_second(recognizer, batch, args.seconds):>9.1f}", flush=True)
    print(f"{'tracks':>6} {'ms/frame':>9} {'clips/s':>9}   (one camera, tubes cut every frame, a clip every {args.interval} crops)")
    for tracks in args.tracks:
        ms, rate = per_frame(plugin(args, tracks), tracks, args.frames)
        print(f"{tracks:>6} {ms:>9.1f} {rate:>9.1f}", flush=True)
    cameras_list = [c for c in args.pipeline_cameras if c > 0]
    if cameras_list:
        print(f"daemon on vtest.avi (768x576), Yolo-Fastest-XL 320 + ByteTrack [+ {args.model}, a clip every "
              f"{args.interval} crops, a crop every {args.stride} frames, branch_share {args.share or 'default'}, half {args.half}], "
              f"{args.seconds_pipeline:.0f} s windows")
        print(f"{'cameras':>7} {'actions':>8} {'fps':>7} {'p50 ms':>8} {'p99 ms':>8} {'clips/s':>8} "
              f"{'skipped/s':>9} {'fps ratio':>9}")
    for cameras in cameras_list:
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in ["none", *args.modes]}
        for _ in range(args.rounds):  # the contenders alternate, round after round
            for mode in runs:
                run = pipeline(cameras, mode, args)
                runs[mode].append(run)
                clips = f"{run['clips_s']:>8.1f} {run['skipped_s']:>9.1f}" if mode != "none" else f"{'':>8} {'':>9}"
                print(f"{cameras:>7} {mode:>8} {run['fps']:>7.1f} {run['p50']:>8.0f} {run['p99']:>8.0f} {clips} "
                      f"{'':>9}  {stage_times(run)}  threads {run['threads']}", flush=True)
        if args.rounds > 1 or args.modes:
            summary(cameras, runs)


def summary(cameras: int, runs: dict[str, list[dict[str, Any]]]) -> None:
    """Medians over the rounds: each placement's fps against the median without the recognizer, with the spread of
    its rounds (min-max of each round's fps over that median)."""
    alone = float(np.median([run["fps"] for run in runs["none"]]))
    rounds = ", ".join(f"{run['fps']:.1f}" for run in runs["none"])
    print(f"medians over {len(runs['none'])} rounds, {cameras} camera(s): detection alone {alone:.1f} fps ({rounds})")
    for mode, done in runs.items():
        if mode == "none" or not done:
            continue
        ratios = [run["fps"] / alone for run in done]
        print(f"  {mode:>8}: {float(np.median([run['fps'] for run in done])):.1f} fps, "
              f"{float(np.median([run['fps'] for run in done])) / alone:.2f}x (spread {min(ratios):.2f}-{max(ratios):.2f}), "
              f"clips/s {float(np.median([run['clips_s'] for run in done])):.2f} per {cameras} camera(s), "
              f"skipped/s {float(np.median([run['skipped_s'] for run in done])):.1f}", flush=True)


def stage_times(run: dict[str, Any]) -> str:
    """Each plugin's ms a frame in the chain (for a branch, what it did in the chain)."""
    return "ms/frame " + ", ".join(f"{name} {ms:.1f}" for name, ms in run["stage_ms"].items())


if __name__ == "__main__":
    main()
