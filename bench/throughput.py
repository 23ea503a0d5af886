"""Aggregate frames/s of the whole daemon (capture → batch → detector → tracker → publisher) on vtest.avi.

Runs the real daemon in this process, side by side in one run, for N cameras reading the same file as fast as the
chain consumes (`realtime: false`), with batching off (`max_batch: 1`) and on, and prints the ratios. Each
configuration runs for a fixed time after a warm-up; frames are counted by the scheduler.

    python bench/throughput.py [--cameras 1 4] [--seconds 15] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

from vigild.config import load_config
from vigild.daemon import Daemon

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VIGILD_SHARED", ROOT.parent / "shared")).resolve()


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def config_text(cameras: int, max_batch: int, device: str, detector: str) -> str:
    models = SHARED / "models" / "yolo-fastest-1.1"
    cams = "".join(
        f"  cam{i}:\n    source: {SHARED / 'media' / 'vtest.avi'}\n    realtime: false\n    loop: true\n"
        for i in range(cameras)
    )
    if detector == "darknet":
        plugin = (
            f"  - type: detector\n    backend: darknet\n    cfg: {models}/yolo-fastest-1.1-xl.cfg\n"
            f"    weights: {models}/yolo-fastest-1.1-xl.weights\n    names: {models}/coco.names\n"
            "    classes: [person]\n    confidence: 0.1\n    input_size: 320\n"
        )
    else:  # ultralytics, built from its architecture (no weights can be downloaded here)
        plugin = "  - type: detector\n    weights: yolov8n.yaml\n    confidence: 0.1\n    input_size: 640\n"
    return (
        f"cameras:\n{cams}plugins:\n{plugin}  - type: bytetrack\n"
        f"publisher:\n  endpoint: {free_endpoint()}\nscheduler:\n  max_batch: {max_batch}\n  max_wait_ms: 5\n"
        f"device: {device}\nlog_level: WARNING\n"
    )


def measure(cameras: int, max_batch: int, seconds: float, device: str, detector: str) -> tuple[float, float]:
    """(aggregate frames/s, mean batch size) over `seconds` after a warm-up."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(config_text(cameras, max_batch, device, detector))
    daemon = Daemon(load_config(handle.name))
    daemon.start()
    try:
        time.sleep(3.0)  # warm-up: model load, first batches
        frames0, batches0 = sum(daemon.scheduler.processed.values()), daemon.scheduler.batches
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        frames = sum(daemon.scheduler.processed.values()) - frames0
        batches = daemon.scheduler.batches - batches0
    finally:
        daemon.stop()
        os.unlink(handle.name)
    return frames / elapsed, frames / max(batches, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--detector", choices=["darknet", "ultralytics"], default="darknet")
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    print(
        f"vigild throughput, {args.detector} detector + ByteTrack on vtest.avi (768x576), device {args.device}, {os.cpu_count()} CPUs"
    )
    print(f"{'cameras':>7} {'max_batch':>9} {'fps':>8} {'mean batch':>10} {'ratio':>6}")
    for cameras in args.cameras:
        baseline = None
        for max_batch in (1, args.max_batch):
            fps, mean_batch = measure(cameras, max_batch, args.seconds, args.device, args.detector)
            baseline = baseline or fps
            print(f"{cameras:>7} {max_batch:>9} {fps:>8.1f} {mean_batch:>10.2f} {fps / baseline:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
