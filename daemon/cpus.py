"""How many CPUs this process may keep busy: the smaller of its CPU affinity (`taskset`, a cpuset) and its cgroup CPU
quota (a container's `--cpus`, systemd's `CPUQuota=`), rounded up.

Below everything that sizes work by it: the daemon's torch and OpenCV threads (vigild.service.threads), capture
workers, and plugins (the detector's pipelined forward pass, `vigild quantize`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
"""Where cgroup v1's cpu controller is mounted under the cgroup root, by convention."""


def usable_cpus(affinity: int | Collection[int], cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: str = "") -> int:
    """CPUs a process may keep busy: its affinity, capped by the tightest cgroup CPU quota above it, rounded up.

    `affinity`: the CPUs it may run on (`os.sched_getaffinity(0)`) or their number. `proc_self_cgroup`: the text of
    `/proc/self/cgroup` (`0::/path` for cgroup v2, `N:cpu,cpuacct:/path` for v1); empty means the cgroup at the root
    of `cgroup_root`, as inside a container with its own cgroup namespace. Every cgroup from the process's own up to
    the root is read (a parent's quota caps its children); a directory that is not there (a v1 container sees its
    own cgroup at the mount's root, not under the host path) is skipped.
    """
    count = affinity if isinstance(affinity, int) else len(affinity)
    quota = cgroup_cpu_quota(cgroup_root, proc_self_cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(cgroup_root: Path, proc_self_cgroup: str = "") -> float | None:
    """The tightest CPU quota (quota / period, in CPUs) on the cgroup path, or None where none is set."""
    v2_path, v1_path = "/", "/"
    for line in proc_self_cgroup.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            v2_path = path or "/"
        elif "cpu" in controllers.split(","):
            v1_path = path or "/"
    quotas: list[float] = []
    if (cgroup_root / "cgroup.controllers").is_file():  # cgroup v2 mounted at the root (unified hierarchy)
        for directory in _up_to(cgroup_root, v2_path):
            quotas += _v2_quota(directory / "cpu.max")
    for mount in V1_CPU_MOUNTS:
        mount_root = cgroup_root / mount
        if (mount_root / "cpu.cfs_quota_us").is_file():
            for directory in _up_to(mount_root, v1_path):
                quotas += _v1_quota(directory)
            break  # cpu and cpu,cpuacct are usually the same mount under two names
    return min(quotas) if quotas else None


def _up_to(root: Path, path: str) -> list[Path]:
    """`root/path` and each of its parents up to `root`, those that exist."""
    parts = [part for part in path.split("/") if part and part != ".."]
    chain = [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    return [directory for directory in chain if directory.is_dir()]


def _v2_quota(file: Path) -> list[float]:
    """`cpu.max`: "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit."""
    try:
        fields = file.read_text().split()
    except OSError:
        return []
    if len(fields) != 2 or fields[0] == "max":
        return []
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return []
    return [quota / period] if quota > 0 and period > 0 else []


def _v1_quota(directory: Path) -> list[float]:
    """`cpu.cfs_quota_us` (-1: no limit) over `cpu.cfs_period_us`."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return []
    return [quota / period] if quota > 0 and period > 0 else []


def process_cpus() -> int:
    """`usable_cpus` of this process."""
    try:
        affinity: int | Collection[int] = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    try:
        own_cgroup = Path("/proc/self/cgroup").read_text()
    except OSError:
        own_cgroup = ""
    return usable_cpus(affinity, CGROUP_ROOT, own_cgroup)


PASSIVE_WAITS = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Set for the process before torch loads (unless the environment says otherwise): torch's OpenMP threads sleep
when a parallel op ends instead of spinning for the next. The daemon's cores are shared with decoding, motion,
ONNX Runtime and the rest of the chain; measured on the 2-core CPU (docs/performance.md#motion), spinning cost a
detection at batch 1 13.0 CPU-ms against 8.9 ms passive, for the same wall time."""


def prefer_passive_waits() -> None:
    """Before torch is imported: OMP_WAIT_POLICY=PASSIVE unless set (a torch already loaded keeps what it read)."""
    for name, value in PASSIVE_WAITS.items():
        os.environ.setdefault(name, value)
