"""What the benchmarks give the processes they measure: a clean environment, and the GPU that NVML should sample.

Import this module before anything that imports ultralytics: `START_ENVIRON` is the environment as the benchmark
was started, before ultralytics' import sets `OMP_NUM_THREADS=1` in this process's environment (which every child
would inherit, so that torch in vigild and in the ceilings would run on one thread). Contenders get
`contender_env()`: the start environment without any thread-count variable, so that each chooses its threads
itself (vigild from its CPUs, ultralytics as it does for its users) and reports what it chose.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

START_ENVIRON: dict[str, str] = dict(os.environ)

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OMP_THREAD_LIMIT",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "OPENCV_FOR_THREADS_NUM",
)
"""Variables that set a library's thread count: none of them reaches a contender."""


def contender_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: the environment at the benchmark's start) without thread-count variables, plus `extra`;
    YOLO_OFFLINE=1 unless given (nothing can be downloaded during a benchmark)."""
    env = {
        key: value for key, value in (START_ENVIRON if base is None else base).items() if key not in THREAD_VARIABLES
    }
    env.setdefault("YOLO_OFFLINE", "1")
    env.update(extra)
    return env


@contextlib.contextmanager
def spawning_with(env: dict[str, str]) -> Iterator[None]:
    """os.environ is `env` while multiprocessing's spawn starts children (they copy it), then as it was."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def thread_counts() -> dict[str, int]:
    """What torch and OpenCV in this process use now, as they report it."""
    import cv2
    import torch

    return {"torch": torch.get_num_threads(), "opencv": cv2.getNumThreads()}


# --- the GPU that NVML samples ------------------------------------------------------------------------------------


def nvml_index(
    ordinal: int, visible: str | None, nvml_uuids: Sequence[str], torch_uuid: str | None = None
) -> int | None:
    """NVML's index of the GPU torch calls `cuda:<ordinal>`, or None where there is none (or it cannot be told).

    NVML numbers every GPU of the machine (as nvidia-smi does); torch numbers only those CUDA_VISIBLE_DEVICES
    (`visible`, None when unset) lets it see, in the order listed. `nvml_uuids`: NVML's UUIDs by index
    (`GPU-8932f937-...`). `torch_uuid`, when torch reports the device's UUID, identifies it exactly. Otherwise
    CUDA_VISIBLE_DEVICES is read as CUDA reads it: indices or UUIDs (`GPU-...`, a unique prefix is enough),
    comma-separated, the list ending at the first entry that names no GPU; an empty list hides every GPU.
    Integer entries are taken as NVML indices, which holds with CUDA_DEVICE_ORDER=PCI_BUS_ID or on machines whose
    GPUs are all alike (CUDA's default order puts the fastest first). MIG instances (`MIG-...`) give None: NVML
    reports no utilisation per MIG instance.
    """
    if ordinal < 0:
        return None
    if torch_uuid:
        wanted = torch_uuid if torch_uuid.startswith(("GPU-", "MIG-")) else f"GPU-{torch_uuid}"
        if wanted in nvml_uuids:
            return list(nvml_uuids).index(wanted)
    if visible is None:
        return ordinal if ordinal < len(nvml_uuids) else None
    listed: list[int | None] = []
    for raw in visible.split(","):
        entry = raw.strip()
        if entry.isdigit():
            if int(entry) >= len(nvml_uuids):
                break
            listed.append(int(entry))
        elif entry.startswith("GPU-"):
            matches = [index for index, uuid in enumerate(nvml_uuids) if uuid.startswith(entry)]
            if len(matches) != 1:
                break
            listed.append(matches[0])
        elif entry.startswith("MIG-"):
            listed.append(None)
        else:
            break
    return listed[ordinal] if ordinal < len(listed) else None


def nvml_handle(device: str) -> Any:
    """An NVML handle for torch's `device` (`cuda:N`), or None: not CUDA, no pynvml, or no such GPU."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        uuids = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
            uuids.append(uuid.decode() if isinstance(uuid, bytes) else uuid)
    except Exception:
        return None
    ordinal = int(device.partition(":")[2] or 0)
    torch_uuid = None
    try:
        import torch

        torch_uuid = str(torch.cuda.get_device_properties(ordinal).uuid)
    except Exception:
        pass
    index = nvml_index(ordinal, os.environ.get("CUDA_VISIBLE_DEVICES"), uuids, torch_uuid)
    return None if index is None else pynvml.nvmlDeviceGetHandleByIndex(index)


def vtest_daemon_yaml(shared: Path, cameras: int, extra_plugins: str, device: str, workers: int | None = None,
                      journal: bool = True, camera_extra: str = "") -> str:  # fmt: skip
    """The daemon of the plugin benchmarks: `cameras` looping vtest.avi as fast as the chain takes it, the
    detector and tracker below, then `extra_plugins`; no control socket, events to an unused port, the event
    journal on as by default (in a fresh temporary directory) or off."""
    import tempfile

    video = shared / "media" / "vtest.avi"
    sources = "".join(
        f"  cam{i}:\n    source: {video}\n    realtime: false\n    loop: true\n{camera_extra}" for i in range(cameras)
    )
    capture = f"capture:\n  workers: {workers}\n" if workers is not None else ""
    place = tempfile.mkdtemp(prefix="vigild-bench-journal-")
    journaling = f"  path: {place}/journal.db\n" if journal else "  enabled: false\n"
    return (
        f"cameras:\n{sources}plugins:\n{fastest_tracker_yaml(shared)}{extra_plugins}"
        f"publisher:\n  endpoint: tcp://127.0.0.1:0\njournal:\n{journaling}control:\n  enabled: false\n{capture}"
        f"device: {device}\nlog_level: WARNING\n"
    )


def start_daemon(config: str) -> Any:
    """A started `Daemon` of the YAML text `config` (in this process)."""
    import tempfile

    from vigild.config.loading import load_config
    from vigild.service.daemon import Daemon

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(config)
    try:
        daemon = Daemon(load_config(handle.name))
    finally:
        os.unlink(handle.name)
    return daemon


def fastest_tracker_yaml(shared: Path) -> str:
    """The plugins of the daemon benchmarks: the shared Yolo-Fastest-XL person detector at 320 and ByteTrack."""
    fastest = shared / "models" / "yolo-fastest-1.1"
    return (
        f"  - type: detector\n    backend: darknet\n    cfg: {fastest}/yolo-fastest-1.1-xl.cfg\n"
        f"    weights: {fastest}/yolo-fastest-1.1-xl.weights\n    names: {fastest}/coco.names\n"
        "    classes: [person]\n    confidence: 0.3\n    input_size: 320\n"
        "  - type: bytetrack\n"
    )


def in_fresh_process(target: Any, args: tuple[Any, ...], timeout: float) -> Any:
    """`target(*args, results)` in a spawned process with the environment the benchmark started with (less thread
    variables); what it puts on `results`."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    worker = context.Process(target=target, args=(*args, results))
    with spawning_with(contender_env()):
        worker.start()
    result = results.get(timeout=timeout)
    worker.join()
    return result


def run_daemon(text: str, warmup: float, seconds: float, results: Any) -> None:
    """(In a fresh process: `in_fresh_process`.) The daemon of the YAML `text`, started; after `warmup` s, the frames
    its chain finished and the events it published over `seconds` s, per second, and its journal's status."""
    daemon = start_daemon(text)
    daemon.start()
    try:
        time.sleep(warmup)
        scheduler = daemon.scheduler
        frames0 = sum(scheduler.processed.values())
        events0 = daemon.publisher.last_seq
        began = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        frames = sum(scheduler.processed.values()) - frames0
        events = daemon.publisher.last_seq - events0
        journal = daemon.journaling.status()
    finally:
        daemon.stop()
    results.put({"fps": frames / elapsed, "events_s": events / elapsed, "journal": journal})
