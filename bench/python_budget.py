"""How many frames/s one Python process can carry around the model: the measurement behind docs/inference.md.

The model runs on the device and releases the GIL; what holds the GIL is the Python work per frame around it.
This measures each part on its own, with vigild's real code, on this machine:

- tracking: the `bytetrack` plugin with `--objects` boxes moving every frame, on batches of one frame from each of
  `--batch-cameras` cameras as the scheduler hands them over (CPU time per frame);
- publishing: the real `Publisher` thread encoding and sending `track.update`-sized events (CPU per event);
- capture: `--cameras` capture threads reading the 1080p H.264 file as fast as a drain thread takes the frames;
  the capture threads' own CPU per frame (the Python side plus the I420 → BGR conversion, an upper bound on
  their GIL time; decoding runs in GStreamer's threads without the GIL) and the whole process's CPU per frame;
- capture with workers (`capture.workers`, one run per `--workers` value, 0 skipped): the same cameras captured
  in worker processes (vigild.capture.pool.CaptureWorkers), frames in shared memory, drained the same way. What
  holds the GIL in this process is then each worker's receiving thread (`capture-worker-<n>`: it reads the
  worker's socket and puts the frames into the exchange) and the drain thread (taking the frames, and letting go
  of them, which gives their slots back); also the whole process's CPU per frame, and the workers' (from
  /proc/<pid>/stat), per frame.

It prints the per-frame budget and the frames/s at which the GIL alone would be saturated, with capture threads
and with each number of workers.

    python bench/python_budget.py [--objects 30] [--cameras 4] [--batch-cameras 16] [--seconds 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of another process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tracking_ms(objects: int, frames: int, cameras: int) -> float:
    from vigild.config.loading import CameraConfig
    from vigild.events import add_track_events
    from vigild.frame import Detections, Frame
    from vigild.plugin import PluginContext
    from vigild.plugins.tracking.bytetrack import ByteTrack, ByteTrackConfig

    names = [f"c{n}" for n in range(cameras)]
    context = PluginContext("cpu", {name: CameraConfig(source=name) for name in names})
    tracker = ByteTrack(ByteTrackConfig(update_interval=1.0), context)
    tracker.start()
    rng = np.random.default_rng(0)
    start = rng.uniform(0, 1800, (objects, 2)).astype(np.float32)
    velocity = rng.uniform(-3, 3, (objects, 2)).astype(np.float32)
    image = np.zeros((8, 8, 3), np.uint8)
    batches = max(1, frames // cameras)
    scene = []
    for i in range(batches):
        corner = start + velocity * i
        xyxy = np.concatenate([corner, corner + 60], axis=1)
        scene.append(Detections.untracked(xyxy, np.full(objects, 0.8, np.float32), np.zeros(objects, np.int32), ("p",)))
    began = time.process_time()
    for i in range(batches):
        batch = [Frame(name, i, time.time(), time.monotonic(), image, detections=scene[i]) for name in names]
        tracker.process(batch)
        for frame in batch:  # the track events, as the chain makes them after its last plugin
            add_track_events(frame)
    return (time.process_time() - began) / (batches * cameras) * 1000


def publishing_ms(events: int) -> float:
    from vigild.config.loading import PublisherConfig
    from vigild.events import Event
    from vigild.outputs.publisher import Publisher

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    publisher = Publisher(PublisherConfig(endpoint=endpoint, queue_size=events + 10))
    publisher.start()
    thread = publisher._thread  # the publisher's own thread: its CPU is the cost of encoding and sending
    assert thread.native_id is not None
    obj = {"track_id": 17, "label": "person", "class_id": 0, "confidence": 0.9123, "bbox": [10.5, 20.5, 80.1, 200.7]}
    cpu0 = thread_cpu_s(thread.native_id)
    for i in range(events):
        publisher.publish(Event("track.update", "cam0", time.time(), i, dict(obj), {"age_s": 1.0}))
    while publisher.stats.sent + publisher.stats.dropped_unsendable < events:
        time.sleep(0.01)
    cost = thread_cpu_s(thread.native_id) - cpu0
    publisher.stop()
    return cost / events * 1000


class Drain(threading.Thread):
    """Takes every frame from the exchange as the scheduler would, counting them."""

    def __init__(self, exchange: Any, cameras: int):
        super().__init__(name="drain", daemon=True)
        self.exchange, self.cameras = exchange, cameras
        self.taken = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.taken += len(self.exchange.take(self.cameras, 0.005, self.cameras, 0.2).frames)


def capture_ms(cameras: int, seconds: float) -> tuple[float, float, float, float]:
    """(capture threads' CPU ms per frame, whole process CPU ms per frame, frames/s, drain thread's CPU ms per
    frame)."""
    from throughput import h264

    from vigild.capture.camera import CameraCapture
    from vigild.capture.exchange import FrameExchange
    from vigild.config.loading import CameraConfig
    from vigild.config.sources import parse_source

    video = h264(1080)
    exchange = FrameExchange()
    config = CameraConfig(source=str(video), realtime=False, loop=True)
    captures = [CameraCapture(f"c{i}", config, parse_source(str(video)), exchange) for i in range(cameras)]
    for capture in captures:
        capture.start()
    drainer = Drain(exchange, cameras)
    drainer.start()
    time.sleep(2.0)
    ids = [c._thread.native_id for c in captures]
    assert drainer.native_id is not None
    cpu0, drain0 = sum(thread_cpu_s(i) for i in ids if i), thread_cpu_s(drainer.native_id)
    proc0, taken0, began = time.process_time(), drainer.taken, time.monotonic()
    time.sleep(seconds)
    frames = drainer.taken - taken0
    elapsed = time.monotonic() - began
    threads_cpu = sum(thread_cpu_s(i) for i in ids if i) - cpu0
    drain_cpu = thread_cpu_s(drainer.native_id) - drain0
    process_cpu = time.process_time() - proc0
    drainer.stop.set()
    for capture in captures:
        capture.stop()
    drainer.join()
    exchange.close()
    per_frame = 1000 / frames
    return threads_cpu * per_frame, process_cpu * per_frame, frames / elapsed, drain_cpu * per_frame


def capture_workers_ms(cameras: int, workers: int, seconds: float, slots: int) -> dict[str, float | int]:
    """The same cameras captured in `workers` worker processes: CPU ms per frame of the workers' receiving threads
    in this process (`receive`), of the drain thread (`drain`), of this whole process (`process`), of the worker
    processes (`workers`); frames/s; worker restarts during the run (a worker that died makes its figures void)."""
    import tempfile

    from throughput import h264

    from vigild.capture.exchange import FrameExchange
    from vigild.capture.pool import CaptureWorkers
    from vigild.config.loading import CameraConfig
    from vigild.config.sources import parse_source
    from vigild.cpus import process_cpus

    video = h264(1080)
    exchange = FrameExchange()
    config = CameraConfig(source=str(video), realtime=False, loop=True)
    # as vigild.service.workers gives them: the usable CPUs shared among the workers for colour conversion
    cv2_threads = max(1, process_cpus() // workers)
    with tempfile.TemporaryDirectory(prefix="vigild-budget-") as runtime_dir:
        pool = CaptureWorkers(workers, slots, exchange, Path(runtime_dir), cv2_threads)
        pool.start()
        captures = [pool.capture(f"c{i}", config, parse_source(str(video))) for i in range(cameras)]
        for capture in captures:
            capture.start()
        drainer = Drain(exchange, cameras)
        drainer.start()
        try:
            time.sleep(3.0)  # the workers start (a Python interpreter each, importing vigild) and their pipelines
            receivers = [t.native_id for t in threading.enumerate() if t.name.startswith("capture-worker-")]
            assert len(receivers) == workers and drainer.native_id is not None, receivers
            pids = [handle.pid for handle in pool.handles]
            restarts0 = sum(handle.restarts for handle in pool.handles)
            receive0 = sum(thread_cpu_s(i) for i in receivers if i)
            drain0 = thread_cpu_s(drainer.native_id)
            workers0 = sum(process_cpu_s(pid) for pid in pids if pid)
            proc0, taken0, began = time.process_time(), drainer.taken, time.monotonic()
            time.sleep(seconds)
            frames = drainer.taken - taken0
            elapsed = time.monotonic() - began
            receive_cpu = sum(thread_cpu_s(i) for i in receivers if i) - receive0
            drain_cpu = thread_cpu_s(drainer.native_id) - drain0
            process_cpu = time.process_time() - proc0
            workers_cpu = sum(process_cpu_s(pid) for pid in pids if pid) - workers0
            restarts = sum(handle.restarts for handle in pool.handles) - restarts0
        finally:
            for capture in captures:
                capture.stop()
            for capture in captures:
                capture.join(5.0)
            drainer.stop.set()
            drainer.join()
            pool.stop()
            exchange.close()
    # a clean stop leaves none of the workers' processes or segments (issue 17)
    alive = [handle.pid for handle in pool.handles if handle.process and handle.process.poll() is None]
    segments = [p.name for p in Path("/dev/shm").glob(f"vigild-{pool.instance}-*")]
    if alive or segments:
        print(f"left after stop: worker pids {alive}, segments {segments}", file=sys.stderr)
    per_frame = 1000 / max(frames, 1)
    return {
        "receive": receive_cpu * per_frame,
        "drain": drain_cpu * per_frame,
        "process": process_cpu * per_frame,
        "workers": workers_cpu * per_frame,
        "fps": frames / elapsed,
        "restarts": restarts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=30)
    parser.add_argument("--cameras", type=int, default=4, help="capture threads")
    parser.add_argument("--batch-cameras", type=int, default=16, help="cameras per tracker batch")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--events-per-frame", type=float, default=1.0, help="published events per processed frame")
    parser.add_argument("--workers", type=int, nargs="+", default=[2],
                        help="capture worker processes, one measurement per value (0: none)")
    parser.add_argument("--slots", type=int, default=6, help="shared-memory slots per camera (capture.slots)")
    args = parser.parse_args()
    track = tracking_ms(args.objects, 1600, args.batch_cameras)
    publish = publishing_ms(20000)
    capture_thread, capture_process, capture_fps, capture_drain = capture_ms(args.cameras, args.seconds)
    with_workers = {n: capture_workers_ms(args.cameras, n, args.seconds, args.slots) for n in args.workers if n > 0}
    base = track + publish * args.events_per_frame
    held = base + capture_thread
    print(f"{os.cpu_count()} CPUs")
    print(f"tracking ({args.objects} objects, {args.batch_cameras} cameras a batch): {track:.3f} ms/frame")
    print(f"publishing:                {publish:.4f} ms/event")
    print(f"capture threads (1080p):   {capture_thread:.3f} ms/frame (drain thread {capture_drain:.3f} ms/frame; "
          f"whole process incl. decode: {capture_process:.2f} ms/frame, {capture_fps:.0f} fps on {args.cameras} cameras)")
    for n, m in with_workers.items():
        in_process = m["receive"] + m["drain"]
        print(f"capture in {n} worker(s):   {in_process:.3f} ms/frame in this process (receiving threads "
              f"{m['receive']:.3f} + drain thread {m['drain']:.3f}); whole process {m['process']:.3f} ms/frame, "
              f"workers {m['workers']:.2f} ms/frame, {m['fps']:.0f} fps on {args.cameras} cameras"
              + (f"  (worker restarts during the window: {m['restarts']}: figures void)" if m["restarts"] else ""))
    print(f"GIL-holding work per frame (upper bound), capture threads: {held:.2f} ms "
          f"-> one process saturates at about {1000 / held:.0f} frames/s")
    for n, m in with_workers.items():
        held_n = base + m["receive"] + m["drain"]
        print(f"GIL-holding work per frame (upper bound), {n} capture worker(s): {held_n:.2f} ms "
              f"(capture's part {m['receive'] + m['drain']:.3f} ms) -> one process saturates at about "
              f"{1000 / held_n:.0f} frames/s")


if __name__ == "__main__":
    main()
