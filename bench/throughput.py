"""Aggregate frames/s of detect + track + publish for N cameras: vigild against what a user would run instead.

In one invocation, for each resolution (vtest.avi scaled to 1080p / 720p and re-encoded to H.264, made once and
cached) and each number of cameras, each in a fresh process, one after the other on the same machine:

- `vigild`: the real daemon (capture threads → cross-camera batcher → detector on the device pipeline →
  ByteTrack → ZeroMQ publisher), every camera a looping file read as fast as the chain consumes (`realtime: false`);
  latency is capture to publish per frame; one run per `--workers` value (`capture.workers`: 0 captures in threads
  of the daemon, N in N worker processes with frames in shared memory, `auto` what the daemon picks), its CPU that
  of the daemon and its workers together;
- `naive`: one ultralytics model per camera thread, `track(persist=True)` per frame (bench/baselines.py);
- `streams`: ultralytics' multi-stream mode, one `.streams` file of all sources (bench/baselines.py);

all with the same weights (yolov8n built from its yaml and saved once: nothing can be downloaded here; speed does
not depend on the weights' values), the same input size and the same confidence. With `--ceilings` it also
measures, in the same run, the decode ceiling (one OpenCV decoding process per camera, nothing else running) and
the device-path ceiling (vigild's letterbox + forward + NMS on frames already decoded, batch `--max-batch`).

    python bench/throughput.py [--cameras 1 4 16] [--resolutions 1080 720] [--seconds 20] [--device auto]
                               [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# first: contenders snapshots the environment before anything imports ultralytics
from contenders import START_ENVIRON, THREAD_VARIABLES, contender_env, nvml_handle, spawning_with, thread_counts

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VIGILD_SHARED", ROOT.parent / "shared")).resolve()
CACHE = Path(os.environ.get("VIGILD_BENCH_CACHE", "/tmp/vigild-bench"))
SIZES = {1080: (1920, 1080), 720: (1280, 720)}


def h264(resolution: int, loops: int = 8) -> Path:
    """vtest.avi (768x576, 10 fps, 795 frames) played `loops` times, scaled to 16:9 `resolution` and encoded with
    x264; cached across runs. Long enough that ultralytics' streams mode (which stops at the end of a file) lasts
    the whole window."""
    width, height = SIZES[resolution]
    out = CACHE / f"vtest_{resolution}p_x{loops}.mp4"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        source = SHARED / "media" / "vtest.avi"
        branches = " ".join(f"filesrc location={source} ! decodebin ! videoconvert ! c." for _ in range(loops))
        pipeline = (
            f"concat name=c ! videoconvert ! videoscale ! video/x-raw,width={width},height={height} ! "
            "x264enc speed-preset=ultrafast key-int-max=30 bitrate=6000 ! h264parse ! mp4mux ! "
            f"filesink location={out}.part {branches}"
        )
        subprocess.run(["gst-launch-1.0", "-q", *pipeline.split()], check=True, timeout=1200)
        Path(f"{out}.part").rename(out)
    return out


def bench_weights() -> Path:
    """yolov8n with its untrained weights, saved once so that every contender loads the very same model.

    Importing ultralytics here sets OMP_NUM_THREADS=1 in this process's environment: contenders are started with
    `contender_env()`, never with os.environ."""
    out = CACHE / "yolov8n-untrained.pt"
    if not out.exists():
        from ultralytics import YOLO

        CACHE.mkdir(parents=True, exist_ok=True)
        YOLO("yolov8n.yaml").save(str(out))
    return out


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def percentiles(samples: list[float]) -> dict[str, float] | None:
    if not samples:
        return None
    p50, p99 = np.percentile(np.array(samples) * 1000, [50, 99])
    return {"p50": round(float(p50), 1), "p99": round(float(p99), 1)}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of another process, e.g. a capture worker, from /proc; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workers_value(text: str) -> int | str:
    """A `capture.workers` value: a whole number, or auto."""
    return text if text == "auto" else int(text)


class GpuSampler:
    """Mean GPU utilisation over a window, through NVML where it is installed (nvidia-ml-py), else None; of the
    physical GPU torch's `device` is (CUDA_VISIBLE_DEVICES renumbers them: contenders.nvml_index)."""

    def __init__(self, device: str):
        self.handle: Any = nvml_handle(device)
        self.samples: list[float] = []

    def sample(self) -> None:
        if self.handle is not None:
            import pynvml

            try:
                self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))
            except pynvml.NVMLError:  # e.g. not supported (a MIG instance): no figure rather than a wrong one
                self.handle = None

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def vigild_config(args: argparse.Namespace) -> str:
    cameras = "".join(
        f"  cam{i}:\n    source: {args.video}\n    realtime: false\n    loop: true\n    backend: {args.capture}\n"
        for i in range(args.cameras)
    )
    half = "" if args.half is None else f"    half: {str(args.half).lower()}\n"
    return (
        f"cameras:\n{cameras}"
        "plugins:\n"
        f"  - type: detector\n    weights: {args.weights}\n    confidence: {args.conf}\n"
        f"    input_size: [{args.imgsz[0]}, {args.imgsz[1]}]\n{half}"
        "  - type: bytetrack\n"
        f"publisher:\n  endpoint: {free_endpoint()}\n"
        "control:\n  enabled: false\n"  # the default socket may be another daemon's on this machine
        f"scheduler:\n  max_batch: {args.max_batch}\n  max_wait_ms: {args.max_wait_ms}\n"
        f"  pipeline: {'true' if args.pipeline_one == 'on' else 'false'}\n"
        f"capture:\n  workers: {args.workers_one}\n"
        f"device: {args.device}\nlog_level: WARNING\n"
    )


def run_vigild(args: argparse.Namespace) -> dict[str, Any]:
    """The daemon in this process: frames the scheduler finished, and latencies, over the measured window."""
    from vigild.config.loading import load_config
    from vigild.service.daemon import Daemon

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(vigild_config(args))
    daemon = Daemon(load_config(handle.name))
    gpu = GpuSampler(daemon.device)
    daemon.start()
    handles = daemon.workers.handles if daemon.workers is not None else []
    try:
        time.sleep(args.warmup)
        scheduler = daemon.scheduler
        frames0, batches0 = sum(scheduler.processed.values()), scheduler.batches
        drops0 = sum(daemon.exchange.drops.values())
        scheduler.latencies_s.clear()
        pids = [handle.pid for handle in handles]
        restarts0 = sum(handle.restarts for handle in handles)
        workers_cpu0 = sum(process_cpu_seconds(pid) for pid in pids if pid)
        cpu0, started = cpu_seconds(), time.monotonic()
        while time.monotonic() - started < args.seconds:
            time.sleep(0.5)
            gpu.sample()
        elapsed = time.monotonic() - started
        cpu = cpu_seconds() - cpu0
        # the workers that ran the window (a restarted one's figures are lost: see worker_restarts)
        workers_cpu = sum(process_cpu_seconds(pid) for pid in pids if pid) - workers_cpu0
        restarts = sum(handle.restarts for handle in handles) - restarts0
        frames = sum(scheduler.processed.values()) - frames0
        batches = scheduler.batches - batches0
        latencies = list(scheduler.latencies_s)
        drops = sum(daemon.exchange.drops.values()) - drops0
        stages = {stage.spec.id: round(stage.seconds, 2) for stage in daemon.chain.stages}
        threads = daemon.status()["threads"]
    finally:
        daemon.stop()
        os.unlink(handle.name)
    leftover = []  # what a clean stop must not leave: the workers' processes, their segments (issue 17)
    if daemon.workers is not None:
        leftover += [f"worker pid {h.pid} still running" for h in handles if h.process and h.process.poll() is None]
        leftover += [f"segment {p.name} left" for p in Path("/dev/shm").glob(f"vigild-{daemon.workers.instance}-*")]
    return {
        "mode": "vigild",
        "cameras": args.cameras,
        "frames": frames,
        "seconds": round(elapsed, 2),
        "fps": round(frames / elapsed, 2),
        "latency_ms": percentiles(latencies),
        "mean_batch": round(frames / max(batches, 1), 2),
        "drops": drops,
        "workers": args.workers_one,
        "capture_workers": len(handles),
        "worker_restarts": restarts,
        "leftover": "; ".join(leftover),
        "cpu_percent": round(100 * (cpu + workers_cpu) / elapsed, 1),
        "cpu_percent_daemon": round(100 * cpu / elapsed, 1),
        "cpu_percent_workers": round(100 * workers_cpu / elapsed, 1),
        # on a CPU shared with other work (a noisy CI box), a steadier comparison than fps
        "frames_per_cpu_second": round(frames / max(cpu + workers_cpu, 1e-9), 2),
        "gpu_util_percent": gpu.mean(),
        "plugin_seconds": stages,
        "threads": threads,
    }


def _decode_worker(video: str, seconds: float, counter: Any) -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per camera: each decodes on its own (FFmpeg's threads are its own choice)
    capture = cv2.VideoCapture(video)
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        ok = capture.grab() and capture.retrieve()[0]
        if not ok:
            capture.release()
            capture = cv2.VideoCapture(video)
            continue
        count += 1
    with counter.get_lock():
        counter.value += count


def decode_ceiling(video: Path, processes: int, seconds: float) -> float:
    """Frames/s decoded (to BGR) by `processes` OpenCV processes at once, nothing else running."""
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    workers = [context.Process(target=_decode_worker, args=(str(video), seconds, counter)) for _ in range(processes)]
    with spawning_with(contender_env()):
        for worker in workers:
            worker.start()
    for worker in workers:
        worker.join()
    return round(counter.value / seconds, 1)


def device_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """Frames/s of vigild's letterbox + forward + NMS on frames already decoded, batches of `max_batch`."""
    import cv2

    from vigild.plugins.detection.yolo import YoloBackend
    from vigild.service.threads import apply_threads, choose_threads
    from vigild.vision.device import default_half, resolve_device

    device = resolve_device(args.device)
    half = default_half(device) if args.half is None else args.half
    backend = YoloBackend.load(
        str(args.weights), tuple(args.imgsz), args.conf, 0.45, device, half
    )
    # as the daemon does, after the load (importing ultralytics sets cv2.setNumThreads(0)): the daemon's ceiling
    apply_threads(choose_threads(None))
    capture = cv2.VideoCapture(str(args.video))
    frames = [capture.read()[1] for _ in range(args.max_batch)]
    for _ in range(3):
        backend.detect(frames)
    done, started = 0, time.monotonic()
    while time.monotonic() - started < min(args.seconds, 10):
        backend.detect(frames)
        done += len(frames)
    return {"device_fps": round(done / (time.monotonic() - started), 1), "threads": thread_counts()}


def in_subprocess(
    mode: str, args: argparse.Namespace, cameras: int, workers: int | str = 0, pipeline: str = "on"
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [
        sys.executable, __file__, "--run", mode, "--json", str(out), "--video", str(args.video),
        "--cameras-one", str(cameras), "--weights", str(args.weights), "--conf", str(args.conf),
        "--imgsz", str(args.imgsz[0]), str(args.imgsz[1]), "--device", args.device, "--seconds", str(args.seconds),
        "--warmup", str(args.warmup), "--max-batch", str(args.max_batch), "--capture", args.capture,
        "--workers-one", str(workers), "--pipeline-one", pipeline,
    ]  # fmt: skip
    if args.half is not None:
        command += ["--half", str(args.half).lower()]
    subprocess.run(command, check=True, timeout=args.seconds + args.warmup + 600, env=contender_env())
    result = json.loads(out.read_text())
    out.unlink()
    return result


def threads_of(result: dict[str, Any]) -> str:
    """The contender's own report of its CPU threads: vigild's heartbeat figures, or what ultralytics' inference
    threads saw (bench/baselines.py)."""
    threads = result.get("threads") or result.get("torch_threads")
    if isinstance(threads, dict):
        return ",".join(f"{key}={value}" for key, value in threads.items() if key in ("torch", "opencv", "intra_op"))
    return str(threads) if threads is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--resolutions", type=int, nargs="+", choices=sorted(SIZES), default=[1080])
    parser.add_argument("--modes", nargs="+", choices=["vigild", "naive", "streams"], default=["vigild", "naive", "streams"])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per run")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before the window (model load, first batches)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--imgsz", type=int, nargs=2, default=[640, 384], metavar=("W", "H"),
                        help="model input; 640x384 is what ultralytics' letterbox makes of 16:9 frames at 640")
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--half", type=lambda v: v == "true", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="scheduler max_batch; default 64 on CUDA, 8 on the CPU (larger CPU batches fall out of cache)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--capture", choices=["auto", "gstreamer", "opencv"], default="auto")
    parser.add_argument("--precisions", nargs="+", choices=["auto", "full", "half"], default=["auto"],
                        help="vigild rows: the device's default (fp16 on CUDA, fp32 on the CPU), fp32, or half "
                        "(fp16 on CUDA, bf16 on the CPU); ultralytics' loops use its defaults (fp32 on the CPU)")
    parser.add_argument("--workers", type=workers_value, nargs="+", default=[0],
                        help="vigild rows: capture.workers values, each its own run (0: capture threads in the "
                        "daemon; auto: what the daemon picks on this machine)")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--ceilings", action="store_true", help="also measure the decode and device-path ceilings")
    parser.add_argument("--json", type=Path, help="write all results here")
    # one measurement in this process (used by the parent run)
    parser.add_argument("--run", choices=["vigild", "ceiling"], help=argparse.SUPPRESS)
    parser.add_argument("--video", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cameras-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers-one", type=workers_value, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", nargs="+", choices=["on", "off"], default=["on"],
                        help="vigild rows: scheduler.pipeline, each its own run (on, then off: the ratio)")
    parser.add_argument("--pipeline-one", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    if args.max_batch is None:
        from vigild.vision.device import resolve_device

        args.max_batch = 64 if resolve_device(args.device).startswith("cuda") else 8

    if args.run:
        args.cameras = args.cameras_one
        result = run_vigild(args) if args.run == "vigild" else device_ceiling(args)
        # what this contender was started with: the parent's imports must not have set any of it
        result["inherited_thread_env"] = {key: START_ENVIRON[key] for key in THREAD_VARIABLES if key in START_ENVIRON}
        args.json.write_text(json.dumps(result))
        return

    args.weights = args.weights or bench_weights()
    print(f"vigild throughput: yolov8n {args.imgsz[0]}x{args.imgsz[1]} conf {args.conf} + ByteTrack + publish, "
          f"vigild precision {', '.join(args.precisions)}, "
          f"device {args.device}, {os.cpu_count()} CPUs, {args.seconds:.0f} s windows", flush=True)
    from vigild.config.settings import CaptureSettings
    from vigild.cpus import process_cpus
    from vigild.service.workers import worker_count

    cpus = process_cpus()
    auto = {cameras: worker_count(CaptureSettings(), cpus, cameras) for cameras in args.cameras}
    print(f"capture.workers: auto on this machine ({cpus} usable CPUs): "
          + ", ".join(f"{n} at {cameras} camera(s)" for cameras, n in auto.items()), flush=True)
    results: list[dict[str, Any]] = []
    for resolution in args.resolutions:
        args.video = h264(resolution)
        if args.ceilings:
            for processes in sorted({min(c, os.cpu_count() or 1) for c in args.cameras}):
                fps = decode_ceiling(args.video, processes, min(args.seconds, 10))
                results.append({"mode": "decode_ceiling", "resolution": resolution, "processes": processes, "fps": fps,
                                "threads": {"opencv": 1}})
                print(f"{resolution}p decode ceiling, {processes} OpenCV processes: {fps} fps", flush=True)
            for precision in args.precisions:
                args.half = {"auto": None, "full": False, "half": True}[precision]
                ceiling = in_subprocess("ceiling", args, 1)
                fps, threads = ceiling["device_fps"], ceiling["threads"]
                results.append({"mode": "device_ceiling", "resolution": resolution, "precision": precision, "fps": fps,
                                "threads": threads, "inherited_thread_env": ceiling["inherited_thread_env"]})
                print(f"{resolution}p device-path ceiling ({precision}, batch {args.max_batch}): {fps} fps, "
                      f"threads {threads}", flush=True)
        print(f"\n{resolution}p  {'cameras':>7} {'mode':>15} {'fps':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu %':>6} "
              f"{'gpu %':>6} {'batch':>6} {'vs naive':>8} {'vs streams':>10} {'vs w0':>6}")
        for cameras in args.cameras:
            row: dict[str, dict[str, Any]] = {}
            runs = [m for m in args.modes if m != "vigild"]
            if "vigild" in args.modes:
                runs += [f"vigild:{p}:{w}:{pl}" for p in args.precisions for w in args.workers for pl in args.pipeline]
            for run in runs:  # vigild last: its rows show the ratios
                mode, _, rest = run.partition(":")
                precision, _, rest = rest.partition(":")
                workers, _, pipeline = rest.partition(":")
                if mode == "vigild":
                    args.half = {"auto": None, "full": False, "half": True}[precision]
                    result = in_subprocess("vigild", args, cameras, workers, pipeline)
                    result["precision"] = precision
                    result["pipeline"] = pipeline
                else:
                    from baselines import run_baseline

                    from vigild.vision.device import resolve_device

                    # ultralytics takes one side and letterboxes 16:9 frames to 640x384 itself (rect mode)
                    # streams mode reads its files as fast as it can and stops at the first end: a short warm-up
                    # (its model loads in about 2 s) leaves more of the file for the window
                    warmup = min(args.warmup, 4.0) if mode == "streams" else args.warmup
                    result = run_baseline(mode, [args.video] * cameras, str(args.weights), max(args.imgsz),
                                          args.conf, resolve_device(args.device), args.seconds, warmup)
                result["resolution"] = resolution
                label = f"vigild/{precision}/w{workers}" if mode == "vigild" else mode
                if mode == "vigild" and pipeline == "off":
                    label += "/nopipe"
                result["label"] = label
                row[label] = result
                results.append(result)
                latency = result.get("latency_ms") or {}
                ratio_naive = ratio_streams = ratio_w0 = ""
                earlier = ""
                if mode == "vigild" and pipeline == "off":
                    piped = row.get(label.removesuffix("/nopipe"))
                    if piped is not None and result["fps"] > 0:  # the pipelined run of the same settings came first
                        piped["ratio_pipeline_vs_off"] = round(piped["fps"] / result["fps"], 2)
                        earlier += f"  pipelined vs this: {piped['ratio_pipeline_vs_off']:.2f}x"
                elif mode == "vigild":
                    threads_row = row.get(f"vigild/{precision}/w0")
                    if workers != "0" and threads_row is not None and threads_row["fps"] > 0:
                        ratio = round(result["fps"] / threads_row["fps"], 2)
                        result["ratio_vs_workers_0"] = ratio
                        ratio_w0 = f"{ratio:.2f}x"
                    elif workers == "0" and result["fps"] > 0:  # rows with workers run before this one
                        for other_label, other in row.items():
                            if other_label.startswith(f"vigild/{precision}/w") and other is not result:
                                other["ratio_vs_workers_0"] = round(other["fps"] / result["fps"], 2)
                                earlier += f"  {other_label} vs this: {other['ratio_vs_workers_0']:.2f}x"
                    for baseline in ("naive", "streams"):
                        if baseline in row:
                            if row[baseline]["fps"] <= 0:
                                continue  # the baseline finished no frame in the window (see its notes)
                            ratio = round(result["fps"] / row[baseline]["fps"], 2)
                            result[f"ratio_vs_{baseline}"] = ratio
                            if baseline == "naive":
                                ratio_naive = f"{ratio:.2f}x"
                            else:
                                ratio_streams = f"{ratio:.2f}x"
                print(f"{resolution}p  {cameras:>7} {label:>15} {result['fps']:>8.1f} {latency.get('p50', '-')!s:>8} "
                      f"{latency.get('p99', '-')!s:>8} {result.get('cpu_percent', '-')!s:>6} "
                      f"{result.get('gpu_util_percent') or '-'!s:>6} {result.get('mean_batch', '-')!s:>6} "
                      f"{ratio_naive:>8} {ratio_streams:>10} {ratio_w0:>6}  threads {threads_of(result)}"
                      + (f"  workers {result['capture_workers']} (cpu % daemon {result['cpu_percent_daemon']}, "
                         f"workers {result['cpu_percent_workers']}"
                         + (f", {result['worker_restarts']} restarts!" if result["worker_restarts"] else "") + ")"
                         if mode == "vigild" and result.get("capture_workers") else "")
                      + (f"  {result['leftover']}!" if result.get("leftover") else "") + earlier, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
