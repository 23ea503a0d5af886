"""The daemon picks its own CPU thread count (torch and OpenCV), whatever OMP_NUM_THREADS its parent left behind.

`usable_cpus` is checked on real files laid out as the kernel lays out cgroup v2 and v1 (a tmp dir stands in for
/sys/fs/cgroup); the end-to-end tests start `vigild run` with a misleading OMP_NUM_THREADS and read the thread
counts torch and OpenCV report back through the heartbeat.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from conftest import VTEST, daemon_env, free_endpoint, vigild

from vigild.cpus import usable_cpus

# --- usable_cpus on cgroup file trees ---------------------------------------------------------------------------------


def cgroup_v2(root: Path, quotas: dict[str, str]) -> Path:
    """A unified (v2) hierarchy: `cgroup.controllers` at the root, `cpu.max` in each cgroup named in `quotas`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    for path, cpu_max in quotas.items():
        directory = root / path.strip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.controllers").write_text("cpu memory pids\n")
        if directory != root:  # the root cgroup has no cpu.max
            (directory / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(root: Path, mount: str, quotas: dict[str, tuple[int, int]]) -> Path:
    """A v1 cpu controller mounted at root/mount, with (cfs_quota_us, cfs_period_us) in each cgroup named."""
    for path, (quota, period) in quotas.items():
        directory = root / mount / path.strip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (directory / "cpu.cfs_period_us").write_text(f"{period}\n")
        (directory / "cpu.shares").write_text("1024\n")
    return root


def test_v2_container_quota_rounds_up(tmp_path):
    # docker run --cpus=1.5 with its own cgroup namespace: the quota is at the root of what the container sees
    root = cgroup_v2(tmp_path, {})
    (root / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(8, root, "0::/\n") == 2
    assert usable_cpus(set(range(8)), root, "0::/\n") == 2


def test_v2_unlimited_quota_leaves_the_affinity(tmp_path):
    root = cgroup_v2(tmp_path, {"/system.slice/vigild.service": "max 100000"})
    assert usable_cpus({0, 1, 2}, root, "0::/system.slice/vigild.service\n") == 3


def test_v2_the_tightest_quota_on_the_path_wins(tmp_path):
    # systemd: CPUQuota=300% on the service, 100% on its slice; the slice's caps the service
    root = cgroup_v2(tmp_path, {"/system.slice": "100000 100000", "/system.slice/vigild.service": "300000 100000"})
    assert usable_cpus(16, root, "0::/system.slice/vigild.service\n") == 1
    # a sibling cgroup's quota is not on our path
    cgroup_v2(tmp_path, {"/user.slice": "50000 100000"})
    assert usable_cpus(16, root, "0::/system.slice/vigild.service\n") == 1
    assert usable_cpus(16, root, "0::/user.slice\n") == 1  # half a CPU is still one thread


def test_v2_affinity_below_the_quota_wins(tmp_path):
    root = cgroup_v2(tmp_path, {"/job": "800000 100000"})
    assert usable_cpus({3, 5}, root, "0::/job\n") == 2


def test_v1_quota_under_a_combined_cpu_cpuacct_mount(tmp_path):
    root = cgroup_v1(tmp_path, "cpu,cpuacct", {"/": (-1, 100000), "/docker/abc": (250000, 100000)})
    own = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/docker/abc\n"
    assert usable_cpus(32, root, own) == 3
    assert usable_cpus(2, root, own) == 2


def test_v1_container_sees_its_own_cgroup_at_the_mount_root(tmp_path):
    # inside a v1 container /proc/self/cgroup names the host path, but the mount shows the container's own cgroup
    root = cgroup_v1(tmp_path, "cpu", {"/": (200000, 100000)})
    assert usable_cpus(16, root, "3:cpu:/docker/0123abcd\n0::/\n") == 2


def test_v1_no_quota(tmp_path):
    root = cgroup_v1(tmp_path, "cpu", {"/": (-1, 100000)})
    assert usable_cpus(6, root, "3:cpu:/\n") == 6


def test_hybrid_v2_without_cpu_controller_is_not_read_as_v2(tmp_path):
    # hybrid layout: v1 controllers under the root, the v2 tree at root/unified (no cpu controller there)
    root = cgroup_v1(tmp_path, "cpu", {"/": (100000, 100000)})
    cgroup_v2(root / "unified", {})
    assert usable_cpus(4, root, "1:cpu:/\n0::/\n") == 1


@pytest.mark.parametrize("content", ["", "garbage\n", "max\n", "0 100000\n", "100000 0\n", "-5 100000\n"])
def test_unreadable_or_meaningless_cpu_max_is_no_limit(tmp_path, content):
    root = cgroup_v2(tmp_path, {})
    (root / "cpu.max").write_text(content)
    assert usable_cpus(4, root, "0::/\n") == 4


def test_no_cgroup_file_system_at_all(tmp_path):
    assert usable_cpus({0, 1, 2, 3, 4}, tmp_path / "absent", "") == 5
    assert usable_cpus(0, tmp_path / "absent", "") == 1  # never zero threads


# --- the daemon: threads from its own budget, not from the environment ------------------------------------------------


def independent_usable_cpus() -> int:
    """This test process's CPUs (a child inherits them): affinity, capped by the CPU quota of the cgroups it is in,
    read here without vigild's code (v2 `cpu.max` and v1 `cpu.cfs_quota_us` along the path in /proc/self/cgroup)."""
    count = len(os.sched_getaffinity(0))
    limits: list[float] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        parts = [p for p in path.split("/") if p]
        ancestors = ["/".join(parts[:i]) for i in range(len(parts) + 1)]
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            files = [(Path("/sys/fs/cgroup", a, "cpu.max"), None) for a in ancestors]
        elif "cpu" in controllers.split(","):
            files = [
                (Path(mount, a, "cpu.cfs_quota_us"), Path(mount, a, "cpu.cfs_period_us"))
                for mount in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct")
                for a in ancestors
            ]
        else:
            continue
        for quota_file, period_file in files:
            if not quota_file.exists():
                continue
            if period_file is None:
                quota, period = quota_file.read_text().split()
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
            if quota not in ("max", "-1"):
                limits.append(int(quota) / int(period))
    return max(1, min([count, *(math.ceil(limit) for limit in limits)]))


def heartbeat_threads(tmp_path: Path, env_threads: str, extra_yaml: str = "") -> dict:
    """Start `vigild run` with OMP_NUM_THREADS/MKL_NUM_THREADS = `env_threads`, return the `threads` of a heartbeat
    sent once a frame has gone through the chain (the plugins loaded)."""
    from conftest import PlainSubscriber

    endpoint = free_endpoint()
    config = tmp_path / "vigild.yaml"
    config.write_text(
        f"cameras:\n  cam:\n    source: {VTEST}\n    loop: true\n"
        f"publisher:\n  endpoint: {endpoint}\n  heartbeat_interval: 0.3\n"
        f"control:\n  enabled: false\n{extra_yaml}\n"
    )
    subscriber = PlainSubscriber(endpoint, tmp_path / "events.jsonl", idle_s=60)
    log = (tmp_path / "daemon.log").open("w")
    process = vigild(
        "run",
        "--config",
        str(config),
        env=daemon_env(OMP_NUM_THREADS=env_threads, MKL_NUM_THREADS=env_threads),
        stderr=log,
    )
    try:

        def working(event: dict) -> bool:
            return event["type"] == "heartbeat" and event["cameras"]["cam"]["frames"] > 0

        messages = subscriber.wait_for(lambda got: any(working(m["event"]) for m in got), 120)
        beat = next(m["event"] for m in messages if working(m["event"]))
    finally:
        process.terminate()
        process.wait(30)
        subscriber.kill()
        log.close()
    assert process.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    return beat["threads"]


# ultralytics' detector (the real yolov8n network, untrained: nothing can be downloaded here): importing ultralytics
# sets OMP_NUM_THREADS=1 and cv2.setNumThreads(0) in the daemon's process, as the plugins load
ULTRALYTICS_DETECTOR = """\
plugins:
  - type: detector
    weights: yolov8n.yaml
    input_size: 320"""


@pytest.mark.e2e
@pytest.mark.capture_modes
def test_daemon_uses_the_cpus_it_may_use_not_omp_num_threads(tmp_path):
    expected = independent_usable_cpus()
    misleading = "1" if expected > 1 else "3"  # anything but the right answer
    threads = heartbeat_threads(tmp_path, misleading, ULTRALYTICS_DETECTOR)
    assert threads == {"torch": expected, "opencv": expected, "usable_cpus": expected, "source": "cpus"}
    assert f"({expected} threads, {expected} usable CPUs)" in (tmp_path / "daemon.log").read_text()


@pytest.mark.e2e
@pytest.mark.capture_modes
def test_torch_threads_setting_wins_over_cpus_and_environment(tmp_path):
    threads = heartbeat_threads(tmp_path, "3", "torch_threads: 1")
    assert threads["torch"] == 1
    assert threads["opencv"] == 1
    assert threads["source"] == "torch_threads"
    assert threads["usable_cpus"] == independent_usable_cpus()
