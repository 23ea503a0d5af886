"""Soak: four cameras looping vtest.avi through the real chain (Yolo-Fastest-XL → ByteTrack → analytics with a line,
a zone and crop snapshots, as configs/plaza-analytics.yaml) for `VIGILD_SOAK_S` seconds (default 300, as under
`make test`; `make soak` 600), in two daemons at once: one with capture threads in the daemon, one with two capture
worker processes.

Why at once: the two modes used to soak one after the other, twice the suite's time for the same window. Run side
by side, each mode still runs the whole window (the checks below are about memory, threads and descriptors holding,
not about speed, and the two compete for the CPU as any neighbour would); one mode only would leave either the
daemon-side capture threads or the workers and their shared memory unsoaked.

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
from pathlib import Path

import psutil
import pytest
import zmq
from conftest import VTEST, daemon_env, free_endpoint, yolo_fastest_yaml
from service import Service, camera_yaml, service_config

from vigild.service.control import ControlClient

SOAK_S = float(os.environ.get("VIGILD_SOAK_S", "300"))  # both capture modes at once
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


def record_prefix(pid: int, timeout: float = 120) -> str:
    """The shared-memory name prefix the daemon `pid` wrote in its instance record (vigild.capture.shm), waited for:
    the record appears once its workers start, which on a loaded machine may be well after the first sample. Other
    daemons' records (the suite's runtime directory is shared) may come and go while they are read."""
    from vigild.capture import shm
    from vigild.client import default_runtime_dir

    directory = default_runtime_dir(daemon_env()) / "shm"
    deadline = time.monotonic() + timeout
    while True:
        mine = []
        for path in directory.glob("*.json"):
            try:
                record = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                continue  # being removed by its daemon's stop
            if record.get("pid") == pid:
                mine.append(record.get("prefix") or shm.instance_prefix(record["instance"]))
        if len(mine) == 1:
            return mine[0]
        assert len(mine) < 2, f"daemon {pid} has {len(mine)} records in {directory}"
        assert time.monotonic() < deadline, f"no record of daemon {pid} in {directory} within {timeout} s"
        time.sleep(0.5)


def segments(prefix: str) -> tuple[int, int]:
    """(number, bytes) of the shared-memory segments whose names start with `prefix`."""
    from vigild.capture import shm

    found = [p for p in shm.SHM_DIR.iterdir() if p.name.startswith(prefix)]
    return len(found), sum(p.stat().st_size for p in found if p.exists())


def worker_processes(process: psutil.Process) -> list[psutil.Process]:
    return [child for child in process.children() if "vigild.capture.worker" in " ".join(child.cmdline())]


class Soaked:
    """One daemon of the window, with its subscriber and what was sampled of it."""

    def __init__(self, folder: Path, workers: int):
        folder.mkdir(mode=0o700)  # the control socket (service_config) needs an owner-only directory
        self.mode = f"capture workers: {workers}"
        self.workers = workers
        cameras = "".join(camera_yaml(name, VTEST, loop=True, realtime=False, **GEOMETRY) for name in CAMERAS)
        plugins = f"{yolo_fastest_yaml()}\n  - type: bytetrack\n{ANALYTICS}"
        endpoint = free_endpoint()
        # two daemons side by side in the suite's runtime directory: each its own replay socket
        extra = f"capture:\n  workers: {workers}\njournal:\n  replay_endpoint: ipc://{folder}/replay\n"
        config = service_config(folder, cameras, endpoint, plugins=plugins, extra=extra)
        self.events = AnalyticsEvents(endpoint)
        self.events.start()
        assert self.events.subscribed.wait(10)
        self.service = Service(folder, config)
        self.process = psutil.Process(self.service.process.pid)
        self.prefix: str | None = None
        self.samples: list[tuple[float, int, int, int, int, float]] = []
        self.worker_samples: list[tuple[float, int, tuple[int, ...], int, tuple[int, ...], tuple[int, int]]] = []

    def sample(self, elapsed: float) -> None:
        assert self.service.process.poll() is None, f"{self.mode}: {self.service.log_text()[-2000:]}"
        with self.process.oneshot():
            rss, threads, fds = self.process.memory_info().rss, self.process.num_threads(), self.process.num_fds()
        if self.workers:
            self.prefix = self.prefix or record_prefix(self.process.pid)
            children = sorted(worker_processes(self.process), key=lambda child: child.pid)
            self.worker_samples.append(
                (
                    elapsed,
                    sum(child.memory_info().rss for child in children),
                    tuple(child.num_threads() for child in children),
                    sum(child.num_fds() for child in children),
                    tuple(child.pid for child in children),
                    segments(self.prefix),
                )
            )
        try:
            with ControlClient(self.service.control_endpoint, timeout=10) as client:
                reply, _ = client.request("status")
            status = reply["result"]
            frames = sum(camera["frames"] for camera in status["cameras"].values())
            analytics_s = status["plugins"].get("analytics", {}).get("seconds", -1.0)
        except TimeoutError:
            frames, analytics_s = -1, -1.0
        self.samples.append((elapsed, rss, threads, fds, frames, analytics_s))

    def close(self) -> None:
        self.service.kill()
        self.events.stop.set()
        self.events.join(5)

    def check(self) -> None:
        mode, samples, events = self.mode, self.samples, self.events
        settled = [s for s in samples if s[0] >= WARMUP_S]
        first, last = settled[0], settled[-1]
        report = "\n".join(
            f"{t:7.1f} s  rss {r / 2**20:8.1f} MiB  threads {th}  fds {fd}  frames {f}  analytics {a:.2f} s"
            for t, r, th, fd, f, a in samples
        )
        print(f"\n{mode}: soak {SOAK_S:.0f} s, warm-up {WARMUP_S:.0f} s\n{report}\nevents {dict(events.counts)}")
        assert last[4] > first[4] > 0, f"{mode}: the cameras stopped moving"
        assert last[5] > first[5] > 0, f"{mode}: the analytics plugin did no work after the warm-up\n{report}"
        for camera in CAMERAS:
            # vtest's plaza has people on the footpath from its first frame: every camera's tracks enter the zone
            assert events.counts[camera, "zone.enter"] > 0, (
                f"{mode}: no zone.enter from {camera}: {dict(events.counts)}"
            )
        assert events.snapshots > 0, f"{mode}: no event carried its crop"
        growth = max(s[1] for s in settled) / first[1] - 1
        assert growth < 0.05, f"{mode}: resident memory grew {growth:.1%} after the warm-up\n{report}"
        # threads: GStreamer's pool starts and ends a thread or two around each file's loop, so the count is held to a
        # narrow band with no upward drift rather than one number
        threads = [s[2] for s in settled]
        third = max(1, len(threads) // 3)
        assert max(threads) - min(threads) <= 3, f"{mode}: thread count varied\n{report}"
        assert sum(threads[-third:]) / third <= sum(threads[:third]) / third + 0.5, (
            f"{mode}: threads drifted up\n{report}"
        )
        # descriptors: a file's loop (GStreamer reopening it) can hold one more for a moment, as it starts a thread;
        # a leak shows as a count that stays up, so the last third's median must be the first count
        fds = [s[3] for s in settled]
        assert max(fds) <= first[3] + 2, f"{mode}: descriptor count changed\n{report}"
        assert sorted(fds[-third:])[third // 2] == first[3], f"{mode}: descriptor count drifted\n{report}"
        if self.workers:
            self.check_workers()

    def check_workers(self) -> None:
        workers, worker_samples = self.workers, self.worker_samples
        settled = [s for s in worker_samples if s[0] >= WARMUP_S]
        first = settled[0]
        report = "\n".join(
            f"{t:7.1f} s  workers {pids}  rss {r / 2**20:8.1f} MiB  threads {th}  fds {fd}  segments {n} ({b / 2**20:.1f} MiB)"
            for t, r, th, fd, pids, (n, b) in worker_samples
        )
        print(f"workers\n{report}")
        assert len(first[4]) == workers, f"expected {workers} worker processes\n{report}"
        assert {s[4] for s in worker_samples} == {first[4]}, f"a worker process died or was replaced\n{report}"
        assert {s[5] for s in settled} == {first[5]}, f"shared-memory segments changed\n{report}"
        assert first[5][0] == len(CAMERAS), f"expected one segment per camera\n{report}"
        growth = max(s[1] for s in settled) / first[1] - 1
        assert growth < 0.05, f"the workers' resident memory grew {growth:.1%} after the warm-up\n{report}"
        assert {s[3] for s in settled} == {first[3]}, f"the workers' descriptor count changed\n{report}"
        for index in range(workers):
            threads = [s[2][index] for s in settled]
            assert max(threads) - min(threads) <= 3, f"worker {index}'s thread count varied\n{report}"


def test_four_cameras_through_detector_tracker_and_analytics_hold_memory_threads_and_descriptors(tmp_path):
    daemons: list[Soaked] = []
    try:
        for workers in (0, 2):
            daemons.append(Soaked(tmp_path / f"workers-{workers}", workers))
        began = time.monotonic()
        while time.monotonic() - began < SOAK_S:
            time.sleep(SAMPLE_S)
            for daemon in daemons:
                daemon.sample(time.monotonic() - began)
        for daemon in daemons:
            code, _ = daemon.service.stop()
            assert code == 0, f"{daemon.mode}: exit {code}"
    finally:
        for daemon in daemons:
            daemon.close()
    for daemon in daemons:
        daemon.check()
