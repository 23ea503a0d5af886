"""How many CPU threads the daemon gives torch and OpenCV, chosen by the daemon rather than taken from the environment.

`OMP_NUM_THREADS`/`MKL_NUM_THREADS` are what a parent process happened to leave behind (importing ultralytics sets
`OMP_NUM_THREADS=1` in its own environment, which every process it starts inherits), so the daemon does not read
them: it uses `torch_threads` from its config if given, else the number of CPUs it may run on, which is the smaller
of its CPU affinity (`taskset`, a cpuset) and its cgroup CPU quota (a container's `--cpus`, systemd's `CPUQuota=`)
rounded up (vigild.cpus).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from vigild.cpus import process_cpus

log = logging.getLogger("vigild")


@dataclass(frozen=True)
class ThreadChoice:
    count: int
    """Threads for torch's intra-op pool and for OpenCV."""
    usable_cpus: int
    source: str
    """`torch_threads` (the config said so) or `cpus` (the CPUs the process may use)."""


def choose_threads(torch_threads: int | None) -> ThreadChoice:
    """`torch_threads` if given, else the CPUs this process may use; the environment's thread variables never."""
    cpus = process_cpus()
    choice = ThreadChoice(torch_threads, cpus, "torch_threads") if torch_threads else ThreadChoice(cpus, cpus, "cpus")
    ignored = {name: os.environ[name] for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if name in os.environ}
    if any(value != str(choice.count) for value in ignored.values()):
        log.info(
            "%s in the environment ignored: %d threads (%s)",
            ", ".join(f"{name}={value}" for name, value in ignored.items()),
            choice.count,
            "torch_threads" if torch_threads else f"{cpus} usable CPUs",
        )
    return choice


def apply_threads(choice: ThreadChoice) -> None:
    """Set torch's and OpenCV's thread counts (both process-wide: torch's threads started later take the same count;
    OpenCV's pool is left alone when it already has that many). Called again after plugins load: importing
    ultralytics sets `cv2.setNumThreads(0)`."""
    import cv2
    import torch

    torch.set_num_threads(choice.count)  # also the count torch's other threads take at their first parallel op
    if cv2.getNumThreads() != choice.count:
        cv2.setNumThreads(choice.count)


def thread_report(choice: ThreadChoice) -> dict[str, Any]:
    """What torch and OpenCV will use now (read back from them, not what was asked), for the heartbeat."""
    import cv2
    import torch

    return {
        "torch": torch.get_num_threads(),
        "opencv": cv2.getNumThreads(),
        "usable_cpus": choice.usable_cpus,
        "source": choice.source,
    }
