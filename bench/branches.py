"""What a slow plugin costs detection, in the chain against beside it as a branch (issue 18).

Side by side in one run, each in a fresh process: the real daemon on vtest.avi (real pedestrians, looping, read as
fast as the chain consumes) with the shared Yolo-Fastest-XL person detector and ByteTrack, and
- no further plugin,
- the semantic segmenter as a branch (its default, `placement: thread`), in a process of its own (`process`),
- the semantic segmenter in the chain (`branch: false`),
- a pure-Python plugin (bench/python_work.py, `--work-ms` a frame) as a branch on a thread (`py-thread`) and in a
  process of its own (`py-process`, `branch: process`),
each for `--cameras` cameras. It reports detection frames/s (frames through the chain), capture-to-publish latency,
and the segmenter's own frames/s and skipped frames. The segmenter runs torchvision's `--model` with random weights
(speed does not depend on them) at `--input-size`.

    python bench/branches.py [--cameras 1 4] [--seconds 30] [--device cpu] [--modes none branch process chain py-thread
                             py-process] [--work-ms 50]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

# contenders (bench/) snapshots the environment as the benchmark started
from contenders import in_fresh_process, start_daemon, vtest_daemon_yaml

SHARED = Path(os.environ.get("VIGILD_SHARED", Path(__file__).resolve().parent.parent.parent / "shared")).resolve()
MODES = {"none": None, "branch": "thread", "process": "process", "chain": "chain", "py-thread": "thread",
         "py-process": "process"}  # fmt: skip
"""The segmenter's `placement:` (`branch`: its default, on a thread); `py-*`: the `python_work` bench plugin
(bench/python_work.py, pure Python, `--work-ms` a frame) instead of the segmenter, on a thread and in a process."""


def config(cameras: int, mode: str, args: argparse.Namespace) -> str:
    if MODES[mode] is None:
        plugin = ""
    elif mode.startswith("py-"):
        plugin = f"  - type: python_work\n    work_ms: {args.work_ms}\n    placement: {MODES[mode]}\n"
    else:
        plugin = (
            f"  - type: semantic_segmenter\n    model: {args.model}\n    weights: null\n"
            f"    input_size: {args.input_size}\n    placement: {MODES[mode]}\n"
        )
    return vtest_daemon_yaml(SHARED, cameras, plugin, args.device, workers=0)


def run(text: str, warmup: float, seconds: float, results: Any) -> None:
    """One daemon in this (fresh) process; puts its figures over the measured window on `results`."""
    import tempfile

    from python_work import install

    install(tempfile.mkdtemp(prefix="vigild-bench-site-"))
    daemon = start_daemon(text)
    daemon.start()
    try:
        time.sleep(warmup)
        scheduler = daemon.scheduler
        stages = {stage.spec.id: stage for stage in daemon.chain.stages}
        segmenter = stages.get("semantic_segmenter") or stages.get("python_work")
        branch = next(iter(daemon.chain.branches.values()), None)
        frames0 = sum(scheduler.processed.values())
        seg0 = segmenter.frames if segmenter else 0
        skipped0 = sum(branch.skipped.values()) if branch else 0
        cpu0 = time.process_time()
        scheduler.latencies_s.clear()
        began = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        cpu = (time.process_time() - cpu0) / elapsed * 100
        frames = sum(scheduler.processed.values()) - frames0
        seg = (segmenter.frames - seg0) if segmenter else 0
        skipped = (sum(branch.skipped.values()) - skipped0) if branch else 0
        latencies = np.array(scheduler.latencies_s) * 1000
    finally:
        daemon.stop()
    p50, p99 = np.percentile(latencies, [50, 99]) if len(latencies) else (float("nan"), float("nan"))
    results.put(
        {
            "fps": frames / elapsed,
            "p50": float(p50),
            "p99": float(p99),
            "segmenter_fps": seg / elapsed,
            "skipped_s": skipped / elapsed,
            "cpu_percent": cpu,
        }
    )


def measure(cameras: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    text = config(cameras, mode, args)
    result: dict[str, Any] = in_fresh_process(run, (text, args.warmup, args.seconds), args.warmup + args.seconds + 600)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--model", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--input-size", type=int, default=520)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window per daemon run")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-ms", type=float, default=50.0, help="py-* modes: Python work a frame")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    print(f"daemon on vtest.avi (768x576), Yolo-Fastest-XL 320 + ByteTrack [+ {args.model} at {args.input_size}], "
          f"{args.device}, {args.seconds:.0f} s windows")
    print(f"{'cameras':>7} {'segmenter':>9} {'fps':>7} {'vs none':>7} {'p50 ms':>8} {'p99 ms':>8} {'seg fps':>8} "
          f"{'skipped/s':>9} {'cpu %':>6}")
    for cameras in args.cameras:
        base = None
        for mode in args.modes:
            result = measure(cameras, mode, args)
            if mode == "none":
                base = result["fps"]
            ratio = f"{result['fps'] / base:.2f}x" if base else ""
            print(f"{cameras:>7} {mode:>9} {result['fps']:>7.1f} {ratio:>7} {result['p50']:>8.0f} {result['p99']:>8.0f} "
                  f"{result['segmenter_fps']:>8.1f} {result['skipped_s']:>9.1f} {result['cpu_percent']:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
