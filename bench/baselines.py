"""What a user would run *instead of* vigild, measured so the benchmark can put our figures beside theirs.

Each measurement runs in a fresh process (``run_baseline`` spawns this script), so one baseline's threads,
torch thread pools and model caches cannot leak into the next. Two baselines:

``naive`` — the loop everyone writes first. One Python thread per camera (video path); each thread has its
own ``ultralytics.YOLO(weights)`` instance and its own ``cv2.VideoCapture``, and loops: read a frame (at the end
of the file the capture is released and re-opened, so every camera loops forever), then
``model.track(frame, persist=True, imgsz, conf, device, tracker, verbose=False)``. Frames are taken as fast as
the thread can go (no pacing to the file's fps), so nothing is dropped: every decoded frame is tracked. Latency
per frame = from just before ``read()`` to just after ``track()`` returns (re-open time included when it happens).

``streams`` — ultralytics' own multi-stream mode. The paths are written one per line to a ``.streams`` file and
``model.track(source=that_file, stream=True, persist=True, ...)`` is iterated; each yielded ``Results`` is one
frame of one source. How ultralytics 8.4.190 (``data/loaders.py: LoadStreams``) treats *files* there:

* one daemon reader thread per source calls ``cap.grab()/retrieve()`` as fast as decoding allows — it is NOT
  paced to the file's fps — and, with the default ``stream_buffer=False``, keeps only the latest frame
  (``imgs[i] = [im]``), so every frame decoded while the model is busy is silently dropped;
* each ``__next__`` takes the newest frame of *every* source (waiting for a fresh one if needed) and the model
  runs them as one batch of N; the N Results are yielded together after the whole batch is done;
* a reader thread stops after ``CAP_PROP_FRAME_COUNT - 1`` frames (no looping); once that source's buffer is
  empty ``__next__`` raises StopIteration and the *whole* generator ends, for all sources. Because reading runs
  at decode speed, a file lasts (frames / decode fps) seconds, often far less than its play time. When this
  happens before the window closes the output says ``ended_early: true`` and the window is cut at that moment
  (``seconds`` is the wall time actually measured) instead of silently counting fewer frames;
* source paths are split on whitespace (``read().rsplit()``), so paths containing spaces are refused here.

No per-frame capture time is exposed by LoadStreams, so ``latency_ms`` is null in ``streams`` mode; instead
``batch_interval_ms`` gives p50/p99 of the time between consecutive batches' completion (one batch = one frame of
each source). ``decoded_frames``/``dropped_frames`` estimate per source how many frames the reader decoded in the
window (``CAP_PROP_POS_FRAMES`` sampled at batch boundaries) and how many of them never reached the model.

Counting, both modes: the clock starts once the model(s) are loaded (naive: also the captures opened), before
any frame is processed; the first ``warmup`` seconds (lazy predictor set-up, first-inference cost) are not
counted; a frame counts if its ``track()`` finished (naive) or its Result was yielded (streams) inside the next
``seconds`` seconds. ``cpu_percent`` = process CPU time (user+sys, all threads) over the window / wall time, in %
of ONE core (``cpu_cores_busy`` = that / 100). ``gpu_util_percent`` = mean of pynvml utilisation samples taken
every 0.2 s in the window, only when the device is CUDA and pynvml imports; else null. ``other_cpu_cores_busy`` is
the CPU that *other* processes used meanwhile (/proc/stat): non-zero means the figures came from a shared machine.

The tracker is passed explicitly (default ``bytetrack.yaml``): ultralytics 8.4.190's own default is
``tracktrack.yaml``, which a user following the docs of earlier releases would not get.

    python bench/baselines.py naive   --videos A.mp4 B.mp4 --weights W.pt [--imgsz 640] [--conf 0.25]
                                      [--device cpu] [--seconds 20] [--warmup 5] [--tracker bytetrack.yaml]
                                      --json OUT.json
    python bench/baselines.py streams --videos ... (same options)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

from contenders import contender_env, nvml_handle  # bench/, this script's own directory

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics is imported: no pip installs, no asset downloads

MODES = ("naive", "streams")
GPU_SAMPLE_S = 0.2


def cpu_seconds() -> float:
    """User+sys CPU time of the whole process (every thread, ours and the libraries')."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine (all processes) from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile; None for no values (no invented figures)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def p50_p99_ms(seconds: Sequence[float]) -> dict[str, float] | None:
    """p50/p99 of durations given in seconds, in milliseconds."""
    if not seconds:
        return None
    return {"p50": round(percentile(seconds, 50) * 1e3, 2), "p99": round(percentile(seconds, 99) * 1e3, 2)}  # type: ignore[operator]


def torch_cuda_device(device: str) -> str | None:
    """`cuda:N` for an ultralytics device string (`cuda:1`, `0`, `0,1`: the first is used), None for the CPU."""
    dev = device.strip().lower()
    if dev.startswith("cuda"):
        return f"cuda:{int(dev.partition(':')[2] or 0)}"
    if dev and dev.split(",")[0].isdigit():
        return f"cuda:{int(dev.split(',')[0])}"
    return None


class GpuSampler:
    """Samples NVML GPU utilisation in a thread between start() and stop(); mean() is None when unavailable."""

    def __init__(self, device: str) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: Any = None
        self._nvml: Any = None
        cuda = torch_cuda_device(device)
        # the physical GPU behind torch's cuda:N (CUDA_VISIBLE_DEVICES renumbers them); None: pynvml missing or no
        # driver, reported as null, not 0
        self._handle = nvml_handle(cuda) if cuda is not None else None
        if self._handle is not None:
            import pynvml

            self._nvml = pynvml

    def start(self) -> None:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(GPU_SAMPLE_S):
            try:
                self.samples.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
            except Exception:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


class Meter(threading.Thread):
    """Opens the measured window `warmup` s after start() and closes it `seconds` later, or at cut().

    A thread of its own takes the CPU/wall snapshots at the planned instants, so a slow frame or batch in the
    measured loop cannot stretch or shift the window.
    """

    def __init__(self, warmup: float, seconds: float, device: str) -> None:
        super().__init__(name="meter", daemon=True)
        self.warmup, self.seconds = warmup, seconds
        self.gpu = GpuSampler(device)
        self.cut_event = threading.Event()
        self.opened = threading.Event()
        self.done = threading.Event()
        self.t0 = self.t1 = 0.0
        self.cpu_s = 0.0
        self.machine_s: float | None = None
        self.cut_early = False

    def run(self) -> None:
        if self.cut_event.wait(self.warmup):  # ended before the window even opened
            self.cut_early = True
            self.done.set()
            return
        cpu0, busy0, self.t0 = cpu_seconds(), machine_busy_seconds(), time.perf_counter()
        self.gpu.start()
        self.opened.set()
        self.cut_early = self.cut_event.wait(max(0.0, self.t0 + self.seconds - time.perf_counter()))
        cpu1, busy1, self.t1 = cpu_seconds(), machine_busy_seconds(), time.perf_counter()
        self.gpu.stop()
        self.cpu_s = cpu1 - cpu0
        if busy0 is not None and busy1 is not None:
            self.machine_s = busy1 - busy0
        self.done.set()

    def cut(self) -> None:
        """Close the window now (the measured thing stopped early)."""
        self.cut_event.set()
        self.done.wait()

    def inside(self, t: float) -> bool:
        return self.opened.is_set() and self.t0 <= t and (not self.done.is_set() or t <= self.t1)

    def summary(self, mode: str, cameras: int, frames: int) -> dict[str, Any]:
        """The fields common to both modes."""
        wall = self.t1 - self.t0 if self.opened.is_set() else 0.0
        cpu_percent = round(100 * self.cpu_s / wall, 1) if wall > 0 else None
        return {
            "mode": mode,
            "cameras": cameras,
            "frames": frames,
            "seconds": round(wall, 3),
            "fps": round(frames / wall, 2) if wall > 0 else 0.0,
            "cpu_percent": cpu_percent,
            "cpu_cores_busy": round(cpu_percent / 100, 2) if cpu_percent is not None else None,
            "gpu_util_percent": self.gpu.mean(),
            # CPU used by *other* processes meanwhile: non-zero means the figures were taken on a shared machine
            "other_cpu_cores_busy": (
                round(max(0.0, self.machine_s - self.cpu_s) / wall, 2) if self.machine_s is not None and wall else None
            ),
        }


def record_input_shapes(predictor: Any, shapes: set[tuple[int, int]]) -> None:
    """Wrap the predictor's preprocess to note the letterboxed (h, w) it actually feeds the network."""
    original: Callable[[Any], Any] = predictor.preprocess

    def preprocess(im: Any) -> Any:
        out = original(im)
        shapes.add((int(out.shape[-2]), int(out.shape[-1])))
        return out

    predictor.preprocess = preprocess


def torch_threads() -> dict[str, int]:
    """Torch pool sizes as seen by the calling thread (the intra-op setting is per OpenMP thread)."""
    import torch

    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}


THREADS_NOTE = (
    "ultralytics sets OMP_NUM_THREADS=1 at import when unset, and select_device('cpu') calls "
    "torch.set_num_threads(min(8, cpu_count - 1)); torch_threads is what the inference thread(s) saw"
)


def run_naive(args: argparse.Namespace) -> dict[str, Any]:
    """One thread + one YOLO + one VideoCapture per camera, track() frame by frame, files looping."""
    import cv2
    from ultralytics import YOLO

    n = len(args.videos)
    ready = threading.Barrier(n + 1)
    stop = threading.Event()
    done: list[list[tuple[float, float]]] = [[] for _ in range(n)]  # per camera: (completion time, latency)
    reopens = [0] * n
    errors: list[str] = []
    shapes: set[tuple[int, int]] = set()
    seen_threads: list[dict[str, int]] = []

    def worker(i: int, path: str) -> None:
        try:
            model = YOLO(args.weights)
            cap = cv2.VideoCapture(path)
            if not cap.isOpened():
                raise ConnectionError(f"cannot open {path}")
            ready.wait()
            while not stop.is_set():
                t_read = time.perf_counter()
                ok, frame = cap.read()
                if not ok:  # end of file: re-open so the camera loops forever
                    cap.release()
                    cap = cv2.VideoCapture(path)
                    reopens[i] += 1
                    ok, frame = cap.read()
                    if not ok:
                        raise ConnectionError(f"cannot read {path} after re-opening it")
                model.track(
                    frame,
                    persist=True,
                    imgsz=args.imgsz,
                    conf=args.conf,
                    device=args.device,
                    tracker=args.tracker,
                    verbose=False,
                )
                t_done = time.perf_counter()
                if not done[i]:
                    record_input_shapes(model.predictor, shapes)
                    seen_threads.append(torch_threads())
                done[i].append((t_done, t_done - t_read))
            cap.release()
        except threading.BrokenBarrierError:
            return
        except Exception as e:
            errors.append(f"camera {i} ({path}): {type(e).__name__}: {e}")
            ready.abort()

    threads = [
        threading.Thread(target=worker, args=(i, p), name=f"naive-cam{i}", daemon=True)
        for i, p in enumerate(args.videos)
    ]
    for t in threads:
        t.start()
    try:
        ready.wait(timeout=600)
    except threading.BrokenBarrierError:
        raise RuntimeError("; ".join(errors) or "camera threads did not get ready") from None

    meter = Meter(args.warmup, args.seconds, args.device)
    t_begin = time.perf_counter()
    meter.start()
    while not meter.done.wait(0.25):
        if errors or not all(t.is_alive() for t in threads):  # a camera died: cut rather than count less
            meter.cut()
    stop.set()
    for t in threads:
        t.join(timeout=60)

    per_camera = [[lat for (t, lat) in cam if meter.inside(t)] for cam in done]
    latencies = [lat for cam in per_camera for lat in cam]
    notes = [
        "latency = read() start to track() return, per frame; no frames dropped (each thread tracks every frame "
        "it decodes, unpaced); files re-opened at EOF",
        f"{n} YOLO instance(s) in {n} Python thread(s) of one process (GIL shared)",
        THREADS_NOTE,
    ]
    late = [i for i, cam in enumerate(done) if not cam or (meter.opened.is_set() and cam[0][0] > meter.t0)]
    if late:
        notes.append(f"camera(s) {late} finished no frame during warmup; raise --warmup")
    first = [round(cam[0][0] - t_begin, 2) if cam else None for cam in done]
    if errors:
        notes.append("errors: " + "; ".join(errors))
    return {
        **meter.summary("naive", n, len(latencies)),
        "latency_ms": p50_p99_ms(latencies),
        "ended_early": meter.cut_early,
        "notes": notes,
        "per_camera_frames": [len(cam) for cam in per_camera],
        "reopens": reopens,
        "first_frame_s": first,
        "input_shapes": sorted(shapes),
        "tracker": args.tracker,
        "torch_threads": seen_threads[0] if len({str(t) for t in seen_threads}) == 1 else seen_threads,
    }


def run_streams(args: argparse.Namespace) -> dict[str, Any]:
    """ultralytics' LoadStreams over a .streams file: one batch of N latest frames per step, extra frames dropped."""
    import cv2
    from ultralytics import YOLO

    n = len(args.videos)
    bad = [p for p in args.videos if any(c.isspace() for c in p)]
    if bad:
        raise ValueError(f"LoadStreams splits .streams files on whitespace; cannot use {bad}")
    model = YOLO(args.weights)
    tmpdir = Path(tempfile.mkdtemp(prefix="vigild-baseline-"))  # removed in the finally below
    streams_file = tmpdir / "cameras.streams"
    streams_file.write_text("".join(f"{os.path.abspath(p)}\n" for p in args.videos))
    gen = model.track(
        source=str(streams_file),
        stream=True,
        persist=True,
        imgsz=args.imgsz,
        conf=args.conf,
        device=args.device,
        tracker=args.tracker,
        verbose=False,
    )
    predictor = model.predictor  # created by track() before the generator first runs
    shapes: set[tuple[int, int]] = set()
    record_input_shapes(predictor, shapes)

    meter = Meter(args.warmup, args.seconds, args.device)
    t_begin = time.perf_counter()
    meter.start()
    t_first: float | None = None
    k = 0  # results seen; result k is frame of source k % n
    per_camera = [0] * n
    batch_done: list[float] = []  # completion time of each batch inside the window
    speeds: list[dict[str, float]] = []
    pos_first: list[float | None] = [None] * n
    pos_last: list[float | None] = [None] * n
    exhausted = False
    sources_ended: list[int] = []
    source_info: dict[str, Any] = {}
    seen_threads: dict[str, int] = {}
    try:
        while True:
            try:
                result = next(gen)
            except StopIteration:
                exhausted = True
                break
            now = time.perf_counter()
            t_first = now if t_first is None else t_first
            if meter.done.is_set():
                break
            i = k % n
            k += 1
            if not seen_threads:
                seen_threads = torch_threads()
            if not meter.inside(now):
                continue
            per_camera[i] += 1
            speeds.append(dict(result.speed))
            if i == 0:  # first Result of a batch: the whole batch has just finished
                batch_done.append(now)
                dataset = predictor.dataset
                for j, cap in enumerate(getattr(dataset, "caps", [])[:n]):
                    pos = cap.get(cv2.CAP_PROP_POS_FRAMES) if cap is not None else 0.0
                    if pos > 0:
                        pos_first[j] = pos if pos_first[j] is None else pos_first[j]
                        pos_last[j] = pos
        dataset = predictor.dataset
        source_info = {
            "source_frame_count": list(getattr(dataset, "frames", [])),
            "source_fps": [round(float(f), 2) for f in getattr(dataset, "fps", [])],
        }
        sources_ended = [j for j, t in enumerate(getattr(dataset, "threads", [])) if t is not None and not t.is_alive()]
    finally:
        if not meter.done.is_set():
            meter.cut()
        gen.close()  # runs the predictor's finally: LoadStreams.close() stops and joins the reader threads
        shutil.rmtree(tmpdir, ignore_errors=True)

    frames = sum(per_camera)
    ended_early = exhausted and meter.cut_early
    decoded = [
        int(last - first) if first is not None and last is not None else None
        for first, last in zip(pos_first, pos_last, strict=True)
    ]
    intervals = [b - a for a, b in pairwise(batch_done)]
    notes = [
        "latency_ms is null: LoadStreams exposes no per-frame capture time; batch_interval_ms = time between "
        f"consecutive completed batches (1 batch = 1 frame from each of the {n} sources)",
        "reader threads decode each file as fast as they can (not paced to fps) and keep only the newest frame "
        "(stream_buffer=False); decoded_frames/dropped_frames are per source, sampled at batch ends (approximate)",
        THREADS_NOTE,
    ]
    if ended_early:
        notes.append(
            f"ended_early: source(s) {sources_ended or '?'} reached end of file (LoadStreams does not loop files) "
            f"after {round(meter.t1 - meter.t0, 2) if meter.opened.is_set() else 0} s of the {args.seconds} s "
            "window; the whole generator stops then. Use longer files."
        )
    if t_first is None or (meter.opened.is_set() and t_first > meter.t0):
        notes.append("no Result was yielded during warmup (LoadStreams start + first batch); raise --warmup")
    mean_speed = {key: round(sum(s[key] for s in speeds) / len(speeds), 2) for key in speeds[0]} if speeds else None
    return {
        **meter.summary("streams", n, frames),
        "latency_ms": None,
        "batch_interval_ms": p50_p99_ms(intervals),
        "ended_early": ended_early,
        "notes": notes,
        "per_camera_frames": per_camera,
        "decoded_frames": decoded,
        "dropped_frames": [d - c if d is not None else None for d, c in zip(decoded, per_camera, strict=True)],
        "sources_ended": sources_ended,
        "first_result_s": round(t_first - t_begin, 2) if t_first is not None else None,
        **source_info,
        "ultralytics_speed_ms_per_image": mean_speed,
        "input_shapes": sorted(shapes),
        "tracker": args.tracker,
        "torch_threads": seen_threads or None,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--videos", nargs="+", required=True, help="one video path per camera (repeats allowed)")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the measured window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds run but not counted, before the window")
    parser.add_argument("--tracker", default="bytetrack.yaml")
    parser.add_argument("--json", required=True, help="where to write the result")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry: measure, write the JSON, then os._exit so no library thread can keep the process alive."""
    args = build_parser().parse_args(argv)
    try:
        result = run_naive(args) if args.mode == "naive" else run_streams(args)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        code = 0
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_baseline(
    mode: str,
    videos: Sequence[str | os.PathLike[str]],
    weights: str | os.PathLike[str],
    imgsz: int = 640,
    conf: float = 0.25,
    device: str = "cpu",
    seconds: float = 20.0,
    warmup: float = 5.0,
    tracker: str = "bytetrack.yaml",
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run one baseline in a fresh Python process (this script) and return its JSON result."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    with tempfile.TemporaryDirectory(prefix="vigild-baseline-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            mode,
            "--videos",
            *map(str, videos),
            "--weights",
            str(weights),
            "--imgsz",
            str(imgsz),
            "--conf",
            str(conf),
            "--device",
            device,
            "--seconds",
            str(seconds),
            "--warmup",
            str(warmup),
            "--tracker",
            tracker,
            "--json",
            str(out),
        ]
        env = contender_env()  # as the benchmark started: no OMP_NUM_THREADS=1 left by an ultralytics import here
        limit = timeout if timeout is not None else warmup + seconds + 120 + 30 * len(videos)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"baseline {mode} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


if __name__ == "__main__":
    main()
