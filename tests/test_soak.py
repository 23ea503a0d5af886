"""Soak: four cameras looping a real file through detector, tracker and analytics for `VIGILD_SOAK_S` seconds
(default 600; `make soak`). After the warm-up, resident memory must grow less than 5 % and the daemon's threads
open file descriptors must stay as they were, and threads within GStreamer's transient pool threads."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from conftest import VTEST, free_endpoint, yolo_fastest_yaml
from service import Service, camera_yaml, service_config

from vigild.control import ControlClient

SOAK_S = float(os.environ.get("VIGILD_SOAK_S", "600"))
WARMUP_S = min(120.0, SOAK_S / 4)
SAMPLE_S = 5.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SOAK_S + 300)]  # beyond the suite's 300 s per test


def test_four_cameras_for_ten_minutes_hold_memory_threads_and_descriptors(tmp_path):
    cameras = "".join(camera_yaml(f"cam{i}", VTEST, loop=True, realtime=False) for i in range(4))
    plugins = f"{yolo_fastest_yaml()}\n  - type: bytetrack\n  - type: frame_echo\n"
    config = service_config(tmp_path, cameras, free_endpoint(), plugins=plugins)
    service = Service(tmp_path, config)
    samples: list[tuple[float, int, int, int, int]] = []
    try:
        process = psutil.Process(service.process.pid)
        began = time.monotonic()
        while time.monotonic() - began < SOAK_S:
            time.sleep(SAMPLE_S)
            assert service.process.poll() is None, service.log_text()[-2000:]
            with process.oneshot():
                rss, threads, fds = process.memory_info().rss, process.num_threads(), process.num_fds()
            try:
                with ControlClient(service.control_endpoint, timeout=10) as client:
                    reply, _ = client.request("status")
                frames = sum(camera["frames"] for camera in reply["result"]["cameras"].values())
            except TimeoutError:
                frames = -1
            samples.append((time.monotonic() - began, rss, threads, fds, frames))
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()
    settled = [s for s in samples if s[0] >= WARMUP_S]
    first, last = settled[0], settled[-1]
    report = "\n".join(f"{t:7.1f} s  rss {r / 2**20:8.1f} MiB  threads {th}  fds {fd}  frames {f}" for t, r, th, fd, f in samples)
    print(f"\nsoak {SOAK_S:.0f} s, warm-up {WARMUP_S:.0f} s\n{report}")
    assert last[4] > first[4] > 0, "the cameras stopped moving"
    growth = max(s[1] for s in settled) / first[1] - 1
    assert growth < 0.05, f"resident memory grew {growth:.1%} after the warm-up\n{report}"
    # threads: GStreamer's pool starts and ends a thread or two around each file's loop, so the count is held to a
    # narrow band with no upward drift rather than one number
    threads = [s[2] for s in settled]
    third = max(1, len(threads) // 3)
    assert max(threads) - min(threads) <= 3, f"thread count varied\n{report}"
    assert sum(threads[-third:]) / third <= sum(threads[:third]) / third + 0.5, f"thread count drifted up\n{report}"
    assert {s[3] for s in settled} == {first[3]}, f"descriptor count changed\n{report}"
