"""Frames/s decoded by N cameras from H.264 1080p files as fast as possible: GStreamer back end vs OpenCV.

Side by side in one run, through vigild's own capture threads (the same code the daemon runs), each camera
reading a looping file with `realtime: false` into the exchange, which a drain thread empties. Reports the
aggregate frames/s, the CPU time per frame (all threads of this process) and the ratio of the two back ends.
The 1080p file is made once from the shared vtest.avi (scaled, x264 `ultrafast`) and cached.

    python bench/decode.py [--cameras 1 4 16] [--seconds 8] [--frames 300]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import threading
import time
from pathlib import Path

from vigild.capture.camera import CameraCapture
from vigild.capture.exchange import FrameExchange
from vigild.config.loading import CameraConfig
from vigild.config.sources import parse_source

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VIGILD_SHARED", ROOT.parent / "shared")).resolve()
CACHE = Path(os.environ.get("VIGILD_BENCH_CACHE", "/tmp/vigild-bench"))


def h264_1080p(frames: int) -> Path:
    out = CACHE / f"vtest_1080p_{frames}.mp4"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        pipeline = (
            f"filesrc location={SHARED / 'media' / 'vtest.avi'} ! decodebin ! identity eos-after={frames} ! "
            "videoconvert ! videoscale ! video/x-raw,width=1920,height=1080 ! "
            "x264enc speed-preset=ultrafast key-int-max=30 bitrate=6000 ! h264parse ! mp4mux ! "
            f"filesink location={out}.part"
        )
        subprocess.run(["gst-launch-1.0", "-q", *pipeline.split()], check=True)
        Path(f"{out}.part").rename(out)
    return out


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(backend: str, cameras: int, source: Path, seconds: float) -> tuple[float, float]:
    """(aggregate frames/s, CPU ms per frame) over `seconds` after a 1 s warm-up."""
    exchange = FrameExchange()
    config = CameraConfig(source=str(source), backend=backend, realtime=False, loop=True)  # type: ignore[arg-type]
    captures = [CameraCapture(f"cam{i}", config, parse_source(str(source)), exchange) for i in range(cameras)]
    counted = [0]
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            counted[0] += len(exchange.take(cameras, 0.0, 1, 0.1).frames)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    for capture in captures:
        capture.start()
    time.sleep(1.0)
    frames0, cpu0, t0 = counted[0], cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    frames, cpu, elapsed = counted[0] - frames0, cpu_seconds() - cpu0, time.monotonic() - t0
    for capture in captures:
        capture.stop()
    exchange.close()
    stop.set()
    for capture in captures:
        capture.join(5)
    drainer.join(5)
    return frames / elapsed, 1000.0 * cpu / max(frames, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--frames", type=int, default=300, help="length of the 1080p test file")
    args = parser.parse_args()
    source = h264_1080p(args.frames)
    print(f"H.264 1920x1080 file: {source}; {os.cpu_count()} CPU cores; {args.seconds:g} s per point")
    print(f"{'cameras':>7} | {'gstreamer fps':>13} {'ms CPU/frame':>12} | {'opencv fps':>10} {'ms CPU/frame':>12} | ratio")
    for cameras in args.cameras:
        gst_fps, gst_cpu = measure("gstreamer", cameras, source, args.seconds)
        cv_fps, cv_cpu = measure("opencv", cameras, source, args.seconds)
        print(
            f"{cameras:>7} | {gst_fps:>13.1f} {gst_cpu:>12.2f} | {cv_fps:>10.1f} {cv_cpu:>12.2f} | "
            f"{gst_fps / max(cv_fps, 1e-9):.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
