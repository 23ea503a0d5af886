"""What recording costs (issue 33), in one run:

1. **Detection with recording off, on (event clips) and on (continuous segments + event clips)** at `--cameras`
   (4 and 16 by default) cameras of 720p H.264 (vtest.avi's first 400 frames scaled to 1280x720 and encoded once
   with x264, a keyframe every 2 s), each looping as fast as the chain takes it, through Yolo-Fastest-XL and
   ByteTrack; clips start on every `track.new` (pre 2 s, post 3 s, at most 10 s). Each contender in a fresh process, the three
   alternating in a rotating order, `--rounds` times; detection frames/s, medians, the ratio to off (the goal:
   >= 0.95) and the spread.
2. **The CPU of recording per camera**: one camera's capture alone (no detection: the frames are taken and
   dropped), reading the same file as fast as it decodes, with continuous recording (every packet muxed: the most
   recording does) and without, alternating; CPU seconds per second of video each, and the difference.
3. **Bytes written per camera-hour**: from the continuous runs of 2, what the segments hold per second of video,
   times 3600 (this file's bit rate: a camera's own decides it).

    python bench/recording.py [--cameras 4 16] [--seconds 20] [--warmup 8] [--rounds 3] [--skip-daemon]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from contenders import fastest_tracker_yaml, in_fresh_process, start_daemon

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
FPS = 10.0
MODES = ("off", "events", "continuous", "ring")
"""`ring`: recording on, with a trigger that never comes: the encoded stream kept in memory, no file written."""


def encode_720p(folder: Path) -> Path:
    out = folder / "vtest_720p.mp4"
    subprocess.run(["gst-launch-1.0", "-q", *f"filesrc location={SHARED / 'media' / 'vtest.avi'} ! decodebin ! "
                    "identity eos-after=400 ! videoconvert ! videoscale ! video/x-raw,width=1280,height=720 ! "
                    "x264enc speed-preset=veryfast key-int-max=20 bitrate=2500 ! h264parse ! mp4mux ! "
                    f"filesink location={out}".split()], check=True, timeout=600)  # fmt: skip
    return out


def daemon_yaml(source: Path, cameras: int, mode: str) -> str:
    place = tempfile.mkdtemp(prefix="vigild-bench-recording-")
    sources = "".join(f"  cam{i}:\n    source: {source}\n    realtime: false\n    loop: true\n" for i in range(cameras))
    clips = "events: [track.new], pre_s: 2, post_s: 3, max_s: 10"  # a busy scene: a clip every 10 s at most
    recording = {"off": "", "events": f"recording: {{{clips}}}\n",
                 "continuous": f"recording: {{{clips}, continuous: {{segment_s: 10}}}}\n",
                 "ring": "recording: {events: [never.comes], pre_s: 2}\n"}[mode]
    return (f"cameras:\n{sources}plugins:\n{fastest_tracker_yaml(SHARED)}publisher:\n  endpoint: tcp://127.0.0.1:0\n"
            f"journal:\n  path: {place}/journal.db\ncontrol:\n  enabled: false\ncapture:\n  workers: 0\n{recording}"
            "device: cpu\nlog_level: WARNING\n")  # fmt: skip


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads so far, by name (Python's, else the kernel's; digits folded)."""
    import re

    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        name = re.sub(r"\d+", "N", names.get(int(tid), stat[stat.index("(") + 1 : stat.rindex(")")]))
        found[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return found


def run_daemon(text: str, warmup: float, seconds: float, results: Any) -> None:
    """(In a fresh process.) Frames/s through the chain over `seconds` after `warmup`, the recording's status, and
    the CPU of the process and of the recording's own threads (its thread, the writers' and the muxers')."""
    daemon = start_daemon(text)
    daemon.start()
    try:
        time.sleep(warmup)
        frames0 = sum(daemon.scheduler.processed.values())
        cpu0, threads0 = time.process_time(), thread_cpu()
        began = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        cpu, threads = time.process_time() - cpu0, thread_cpu()
        frames = sum(daemon.scheduler.processed.values()) - frames0
        recording = daemon.recording.status() if daemon.recording is not None else {}
    finally:
        daemon.stop()
    mine = ("recording", "clip-", "mux", "appsrc", "parse", "queue")
    used = sum(v - threads0.get(k, 0.0) for k, v in threads.items() if k.split("/")[0].startswith(mine))
    results.put({"fps": frames / elapsed, "recording": recording, "cpu_s": cpu / elapsed,
                 "recording_cpu_s": used / elapsed})  # fmt: skip


def capture_cpu(source: str, record: bool, seconds: float, results: Any) -> None:
    """(In a fresh process.) One camera's capture alone for `seconds`: CPU seconds per second of video, and the
    bytes its continuous segments hold per second of video."""
    from vigild.capture.camera import CameraCapture
    from vigild.capture.clips import RecorderSettings
    from vigild.capture.exchange import FrameExchange
    from vigild.config.settings import CameraConfig
    from vigild.config.sources import parse_source

    root = Path(tempfile.mkdtemp(prefix="vigild-bench-segments-"))
    config = CameraConfig(source=source, realtime=False, loop=True)
    exchange = FrameExchange()
    sizes: list[int] = []
    exchange.clip_listener = lambda report: sizes.append(report.bytes) if report.state.value == "saved" else None
    settings = RecorderSettings(root, 2.0, 2000, 5.0) if record else None
    capture = CameraCapture("cam", config, parse_source(source), exchange, recording=settings)
    stop = threading.Event()
    frames = [0]

    def drain() -> None:
        while not stop.is_set():
            frames[0] += len(exchange.take(8, 0, 1, 0.1).frames)

    drainer = threading.Thread(target=drain, daemon=True)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    capture.start()
    drainer.start()
    time.sleep(seconds)
    decoded = capture.stats.frames_decoded
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    capture.stop()
    exchange.close()
    capture.join(20)
    stop.set()
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    written = sum(p.stat().st_size for p in root.rglob("*.mp4"))
    results.put({"cpu_per_video_s": cpu / (decoded / FPS), "video_s": decoded / FPS,
                 "bytes_per_video_s": written / (decoded / FPS) if record else 0.0})  # fmt: skip


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--capture-seconds", type=float, default=20.0)
    parser.add_argument("--skip-daemon", action="store_true")
    parser.add_argument("--modes", nargs="+", default=list(MODES[:3]), choices=MODES)
    parser.add_argument("--skip-capture", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    source = encode_720p(Path(tempfile.mkdtemp(prefix="vigild-bench-720p-")))
    print(f"source: {source} (1280x720 H.264, 10 fps, a keyframe every 2 s, {source.stat().st_size / 1e6:.1f} MB "
          f"for 40 s)", flush=True)  # fmt: skip
    if not args.skip_daemon:
        for cameras in args.cameras:
            print(f"\n1. {cameras} cameras, Yolo-Fastest-XL 320 + ByteTrack, cpu, {args.seconds:.0f} s windows after "
                  f"{args.warmup:.0f} s; clips on every track.new", flush=True)  # fmt: skip
            print(f"{'round':>5} {'mode':>10} {'fps':>7} {'clips':>6} {'segments':>8} {'writing':>7} {'dropped':>8} "
                  f"{'MB':>6} {'CPU/s':>6} {'rec CPU/s':>9}")  # fmt: skip
            modes = tuple(args.modes)
            fps: dict[str, list[float]] = {mode: [] for mode in modes}
            for round_ in range(args.rounds):
                order = modes[round_ % len(modes) :] + modes[: round_ % len(modes)]
                for mode in order:
                    text = daemon_yaml(source, cameras, mode)
                    result = in_fresh_process(run_daemon, (text, args.warmup, args.seconds), 900)
                    fps[mode].append(result["fps"])
                    rec = result["recording"]
                    print(f"{round_:>5} {mode:>10} {result['fps']:>7.1f} {rec.get('saved', '-'):>6} "
                          f"{rec.get('segments', '-'):>8} {rec.get('writing', '-'):>7} "
                          f"{sum((rec.get('dropped') or {}).values()) if rec else '-':>8} "
                          f"{rec.get('bytes', 0) / 1e6:>6.1f} {result['cpu_s']:>6.2f} {result['recording_cpu_s']:>9.3f}",
                          flush=True)  # fmt: skip
            off = statistics.median(fps["off"])
            for mode in modes[1:]:
                on = statistics.median(fps[mode])
                print(f"{cameras} cameras, {mode}: {on:.1f} frames/s ({spread(fps[mode])}) against off {off:.1f} "
                      f"({spread(fps['off'])}) = {on / off:.3f}x", flush=True)  # fmt: skip
    if args.skip_capture:
        return
    print(f"\n2. one camera's capture alone (720p H.264 decoded as fast as it goes, frames dropped), "
          f"{args.capture_seconds:.0f} s, continuous recording (5 s segments) on and off", flush=True)  # fmt: skip
    print(f"{'round':>5} {'record':>7} {'CPU s / video s':>15} {'video s':>8} {'bytes / video s':>15}")
    cpu: dict[bool, list[float]] = {True: [], False: []}
    rates: list[float] = []
    for round_ in range(args.rounds):
        for record in (False, True) if round_ % 2 == 0 else (True, False):
            result = in_fresh_process(capture_cpu, (str(source), record, args.capture_seconds), 600)
            cpu[record].append(result["cpu_per_video_s"])
            if record:
                rates.append(result["bytes_per_video_s"])
            print(f"{round_:>5} {'on' if record else 'off':>7} {result['cpu_per_video_s']:>15.4f} "
                  f"{result['video_s']:>8.1f} {result['bytes_per_video_s']:>15,.0f}", flush=True)  # fmt: skip
    on, off = statistics.median(cpu[True]), statistics.median(cpu[False])
    print(f"CPU per second of 720p video: {on:.4f} with recording ({spread(cpu[True])}), {off:.4f} without "
          f"({spread(cpu[False])}): recording costs {on - off:.4f} CPU-s per video-s ({(on - off) / off * 100:.1f}% "
          f"of decoding)")  # fmt: skip
    rate = statistics.median(rates)
    print(f"\n3. continuous recording writes {rate * 3600 / 1e9:.2f} GB per camera-hour at this file's bit rate "
          f"({rate * 8 / 1e6:.2f} Mbit/s; {spread([r * 3600 / 1e9 for r in rates])} GB)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
