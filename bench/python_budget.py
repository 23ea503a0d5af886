"""How many frames/s one Python process can carry around the model: the measurement behind docs/inference.md.

The model runs on the device and releases the GIL; what holds the GIL is the Python work per frame around it.
This measures each part on its own, with vigild's real code, on this machine:

- tracking: the `bytetrack` plugin with `--objects` boxes moving every frame, on batches of one frame from each of
  `--batch-cameras` cameras as the scheduler hands them over (CPU time per frame);
- publishing: the real `Publisher` thread encoding and sending `track.update`-sized events (CPU per event);
- capture: `--cameras` capture threads reading the 1080p H.264 file as fast as a drain thread takes the frames;
  the capture threads' own CPU per frame (the Python side plus the I420 → BGR conversion, an upper bound on
  their GIL time; decoding runs in GStreamer's threads without the GIL) and the whole process's CPU per frame.

It prints the per-frame budget and the frames/s at which the GIL alone would be saturated.

    python bench/python_budget.py [--objects 30] [--cameras 4] [--batch-cameras 16] [--seconds 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
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


def capture_ms(cameras: int, seconds: float) -> tuple[float, float, float]:
    """(capture threads' CPU ms per frame, whole process CPU ms per frame, frames/s)."""
    from throughput import h264

    from vigild.capture.camera import CameraCapture
    from vigild.capture.sources import parse_source
    from vigild.config.loading import CameraConfig
    from vigild.pipeline.exchange import FrameExchange

    video = h264(1080)
    exchange = FrameExchange()
    config = CameraConfig(source=str(video), realtime=False, loop=True)
    captures = [CameraCapture(f"c{i}", config, parse_source(str(video)), exchange) for i in range(cameras)]
    for capture in captures:
        capture.start()
    taken = 0
    stop = threading.Event()

    def drain() -> None:
        nonlocal taken
        while not stop.is_set():
            taken += len(exchange.take(cameras, 0.005, cameras, 0.2).frames)

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    time.sleep(2.0)
    ids = [c._thread.native_id for c in captures]
    cpu0 = sum(thread_cpu_s(i) for i in ids if i)
    proc0, taken0, began = time.process_time(), taken, time.monotonic()
    time.sleep(seconds)
    frames = taken - taken0
    elapsed = time.monotonic() - began
    threads_cpu = sum(thread_cpu_s(i) for i in ids if i) - cpu0
    process_cpu = time.process_time() - proc0
    stop.set()
    for capture in captures:
        capture.stop()
    exchange.close()
    return threads_cpu / frames * 1000, process_cpu / frames * 1000, frames / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=30)
    parser.add_argument("--cameras", type=int, default=4, help="capture threads")
    parser.add_argument("--batch-cameras", type=int, default=16, help="cameras per tracker batch")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--events-per-frame", type=float, default=1.0, help="published events per processed frame")
    args = parser.parse_args()
    track = tracking_ms(args.objects, 1600, args.batch_cameras)
    publish = publishing_ms(20000)
    capture_thread, capture_process, capture_fps = capture_ms(args.cameras, args.seconds)
    held = track + publish * args.events_per_frame + capture_thread
    print(f"{os.cpu_count()} CPUs")
    print(f"tracking ({args.objects} objects, {args.batch_cameras} cameras a batch): {track:.3f} ms/frame")
    print(f"publishing:                {publish:.4f} ms/event")
    print(f"capture threads (1080p):   {capture_thread:.3f} ms/frame (whole process incl. decode: {capture_process:.2f} ms/frame, {capture_fps:.0f} fps on {args.cameras} cameras)")
    print(f"GIL-holding work per frame (upper bound): {held:.2f} ms -> one process saturates at about {1000 / held:.0f} frames/s")


if __name__ == "__main__":
    main()
