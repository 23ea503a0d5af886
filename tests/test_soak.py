"""Soak: four cameras looping vtest.avi through the real chain (Yolo-Fastest-XL → ByteTrack → analytics with a line,
a zone and crop snapshots, as configs/plaza-analytics.yaml) for `VIGILD_SOAK_S` seconds (default 600; `make soak`),
split between capture threads in the daemon and two capture worker processes (half each).

After the warm-up, resident memory must grow less than 5 %, open file descriptors must stay as they were, and
threads must stay within GStreamer's transient pool threads with no upward drift. With workers, the same holds for
the workers (memory and descriptors summed over them, each one's threads), the worker processes stay the same ones
(none died), and the daemon's shared-memory segments in /dev/shm stay the same in number and size. The analytics
must have been doing its work the whole time: every camera's zone events reach a subscriber, and the analytics
plugin's time in the daemon's status grows over the settled window.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time

import psutil
import pytest
import zmq
from conftest import VTEST, daemon_env, free_endpoint, yolo_fastest_yaml
from service import Service, camera_yaml, service_config

from vigild.service.control import ControlClient

SOAK_S = float(os.environ.get("VIGILD_SOAK_S", "600")) / 2  # each of the two capture modes
WARMUP_S = min(120.0, SOAK_S / 4)
SAMPLE_S = 5.0
CAMERAS = [f"cam{i}" for i in range(4)]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SOAK_S + 300)]  # beyond the suite's 300 s per test

# configs/plaza-analytics.yaml's line and zone: the plaza's footpath, and a line people walk across
GEOMETRY = {
    "lines": {"crossing": {"points": [[250, 120], [250, 576]]}},
    "zones": {"path": {"points": [[0, 0.31], [1, 0.21], [1, 0.73], [0, 0.73]], "normalized": True}},
}
ANALYTICS = "  - type: analytics\n    min_frames: 3\n    loiter_s: 20\n    count_debounce_s: 1.0\n    snapshot: crop\n"


class AnalyticsEvents(threading.Thread):
    """A plain SUB socket counting each camera's line and zone events (and their snapshots) as they arrive."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.snapshots = 0
        self.stop = threading.Event()
        self.subscribed = threading.Event()

    def run(self) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.SUB)
        for camera in CAMERAS:
            for kind in ("line.", "zone."):
                socket.setsockopt(zmq.SUBSCRIBE, f"vigild.{camera}.{kind}".encode())
        socket.connect(self.endpoint)
        self.subscribed.set()
        while not self.stop.is_set():
            if socket.poll(200):
                topic, _payload, *snapshot = socket.recv_multipart()
                _, camera, kind = topic.decode().split(".", 2)
                self.counts[camera, kind] += 1
                self.snapshots += bool(snapshot)
        socket.close(linger=0)
        context.term()


def segments(pid: int) -> tuple[int, int]:
    """(number, bytes) of the shared-memory segments of the daemon `pid` (its instance, from its record)."""
    from vigild.capture import shm
    from vigild.client import default_runtime_dir

    runtime = default_runtime_dir(daemon_env())
    instances = [
        record["instance"]
        for path in (runtime / "shm").glob("*.json")
        if (record := json.loads(path.read_text() or "{}")).get("pid") == pid
    ]
    assert len(instances) == 1, f"no single record of daemon {pid} in {runtime / 'shm'}"
    found = [p for p in shm.SHM_DIR.iterdir() if p.name.startswith(shm.instance_prefix(instances[0]))]
    return len(found), sum(p.stat().st_size for p in found)


def worker_processes(process: psutil.Process) -> list[psutil.Process]:
    return [child for child in process.children() if "vigild.capture.worker" in " ".join(child.cmdline())]


@pytest.mark.parametrize("workers", [0, 2], ids=["threads", "workers"])
def test_four_cameras_through_detector_tracker_and_analytics_hold_memory_threads_and_descriptors(tmp_path, workers):
    cameras = "".join(camera_yaml(name, VTEST, loop=True, realtime=False, **GEOMETRY) for name in CAMERAS)
    plugins = f"{yolo_fastest_yaml()}\n  - type: bytetrack\n{ANALYTICS}"
    endpoint = free_endpoint()
    config = service_config(tmp_path, cameras, endpoint, plugins=plugins, extra=f"capture:\n  workers: {workers}\n")
    events = AnalyticsEvents(endpoint)
    events.start()
    assert events.subscribed.wait(10)
    service = Service(tmp_path, config)
    samples: list[tuple[float, int, int, int, int, float]] = []
    worker_samples: list[tuple[float, int, tuple[int, ...], int, tuple[int, ...], tuple[int, int]]] = []
    try:
        process = psutil.Process(service.process.pid)
        began = time.monotonic()
        while time.monotonic() - began < SOAK_S:
            time.sleep(SAMPLE_S)
            assert service.process.poll() is None, service.log_text()[-2000:]
            with process.oneshot():
                rss, threads, fds = process.memory_info().rss, process.num_threads(), process.num_fds()
            if workers:
                children = sorted(worker_processes(process), key=lambda child: child.pid)
                worker_samples.append(
                    (
                        time.monotonic() - began,
                        sum(child.memory_info().rss for child in children),
                        tuple(child.num_threads() for child in children),
                        sum(child.num_fds() for child in children),
                        tuple(child.pid for child in children),
                        segments(process.pid),
                    )
                )
            try:
                with ControlClient(service.control_endpoint, timeout=10) as client:
                    reply, _ = client.request("status")
                status = reply["result"]
                frames = sum(camera["frames"] for camera in status["cameras"].values())
                analytics_s = status["plugins"].get("analytics", {}).get("seconds", -1.0)
            except TimeoutError:
                frames, analytics_s = -1, -1.0
            samples.append((time.monotonic() - began, rss, threads, fds, frames, analytics_s))
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()
        events.stop.set()
        events.join(5)
    settled = [s for s in samples if s[0] >= WARMUP_S]
    first, last = settled[0], settled[-1]
    report = "\n".join(
        f"{t:7.1f} s  rss {r / 2**20:8.1f} MiB  threads {th}  fds {fd}  frames {f}  analytics {a:.2f} s"
        for t, r, th, fd, f, a in samples
    )
    print(f"\nsoak {SOAK_S:.0f} s, warm-up {WARMUP_S:.0f} s\n{report}\nevents {dict(events.counts)}")
    assert last[4] > first[4] > 0, "the cameras stopped moving"
    assert last[5] > first[5] > 0, f"the analytics plugin did no work after the warm-up\n{report}"
    for camera in CAMERAS:
        # vtest's plaza has people on the footpath from its first frame: every camera's tracks enter the zone
        assert events.counts[camera, "zone.enter"] > 0, f"no zone.enter from {camera}: {dict(events.counts)}"
    assert events.snapshots > 0, "no event carried its crop"
    growth = max(s[1] for s in settled) / first[1] - 1
    assert growth < 0.05, f"resident memory grew {growth:.1%} after the warm-up\n{report}"
    # threads: GStreamer's pool starts and ends a thread or two around each file's loop, so the count is held to a
    # narrow band with no upward drift rather than one number
    threads = [s[2] for s in settled]
    third = max(1, len(threads) // 3)
    assert max(threads) - min(threads) <= 3, f"thread count varied\n{report}"
    assert sum(threads[-third:]) / third <= sum(threads[:third]) / third + 0.5, f"thread count drifted up\n{report}"
    assert {s[3] for s in settled} == {first[3]}, f"descriptor count changed\n{report}"
    if not workers:
        return
    settled_workers = [s for s in worker_samples if s[0] >= WARMUP_S]
    first_worker = settled_workers[0]
    report = "\n".join(
        f"{t:7.1f} s  workers {pids}  rss {r / 2**20:8.1f} MiB  threads {th}  fds {fd}  segments {n} ({b / 2**20:.1f} MiB)"
        for t, r, th, fd, pids, (n, b) in worker_samples
    )
    print(f"workers\n{report}")
    assert len(first_worker[4]) == workers, f"expected {workers} worker processes\n{report}"
    assert {s[4] for s in worker_samples} == {first_worker[4]}, f"a worker process died or was replaced\n{report}"
    assert {s[5] for s in settled_workers} == {first_worker[5]}, f"shared-memory segments changed\n{report}"
    assert first_worker[5][0] == len(CAMERAS), f"expected one segment per camera\n{report}"
    growth = max(s[1] for s in settled_workers) / first_worker[1] - 1
    assert growth < 0.05, f"the workers' resident memory grew {growth:.1%} after the warm-up\n{report}"
    assert {s[3] for s in settled_workers} == {first_worker[3]}, f"the workers' descriptor count changed\n{report}"
    for index in range(workers):
        threads = [s[2][index] for s in settled_workers]
        assert max(threads) - min(threads) <= 3, f"worker {index}'s thread count varied\n{report}"
