"""What the benchmarks hand their contenders (bench/contenders.py): an environment without the thread settings the
benchmark's own imports left behind, and the physical GPU whose utilisation they sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, VTEST
from test_threads import independent_usable_cpus

sys.path.insert(0, str(ROOT / "bench"))
from contenders import THREAD_VARIABLES, contender_env, nvml_index

# --- nvml_index: torch's cuda:N to NVML's (nvidia-smi's) numbering ----------------------------------------------------

UUIDS = [
    "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6",
    "GPU-1d8cf3a1-71aa-6f1e-2b9c-4e0a7d2c3b11",
    "GPU-1d2f6b4e-0c3a-4e55-9c1d-2b7e8a9f0c22",
    "GPU-77aa0c1e-5b2d-4f3e-8a9b-0c1d2e3f4a5b",
]


def test_without_cuda_visible_devices_the_numbers_agree():
    assert [nvml_index(i, None, UUIDS) for i in range(4)] == [0, 1, 2, 3]
    assert nvml_index(4, None, UUIDS) is None


def test_cuda_visible_devices_by_index_renumbers():
    # CUDA_VISIBLE_DEVICES=2,0: torch's cuda:0 is the machine's GPU 2, cuda:1 is GPU 0
    assert nvml_index(0, "2,0", UUIDS) == 2
    assert nvml_index(1, " 2, 0 ", UUIDS) == 0
    assert nvml_index(2, "2,0", UUIDS) is None


def test_cuda_visible_devices_by_uuid_and_unique_prefix():
    assert nvml_index(0, UUIDS[3], UUIDS) == 3
    assert nvml_index(1, f"{UUIDS[3]},GPU-8932", UUIDS) == 0
    # GPU-1d matches two GPUs: CUDA stops reading the list there
    assert nvml_index(1, "3,GPU-1d,0", UUIDS) is None
    assert nvml_index(0, "GPU-1d8c", UUIDS) == 1


@pytest.mark.parametrize(
    ("visible", "seen"),
    [
        ("", []),  # empty: no GPU at all
        ("-1", []),
        ("1,-1,2", [1]),  # the list ends at the first entry that names no GPU
        ("1,7,2", [1]),  # no GPU 7
        ("0,nvidia,1", [0]),
    ],
)
def test_cuda_visible_devices_ends_at_the_first_invalid_entry(visible, seen):
    assert [nvml_index(i, visible, UUIDS) for i in range(4)] == [*seen, *[None] * (4 - len(seen))]


def test_mig_instances_have_no_gpu_utilisation():
    assert nvml_index(0, "MIG-5f3a0b1c-2d3e-4f5a-6b7c-8d9e0f1a2b3c,1", UUIDS) is None
    assert nvml_index(1, "MIG-5f3a0b1c-2d3e-4f5a-6b7c-8d9e0f1a2b3c,1", UUIDS) == 1


def test_torch_uuid_decides_when_torch_reports_one():
    # torch's UUID is exact whatever the variable says (CUDA's order can differ from NVML's PCI order)
    assert nvml_index(0, "0", UUIDS, torch_uuid=UUIDS[2].removeprefix("GPU-")) == 2
    assert nvml_index(0, None, UUIDS, torch_uuid=UUIDS[1]) == 1
    # a UUID NVML does not list (a MIG instance's) falls back to the variable
    assert nvml_index(0, "3", UUIDS, torch_uuid="5f3a0b1c-0000-0000-0000-000000000000") == 3


# --- the environment contenders get -------------------------------------------------------------------------------------


def test_contender_env_drops_thread_variables_only():
    base = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "1", "X": "y"}
    env = contender_env(base, VIGILD_SHARED="/srv")
    assert env == {
        "PATH": "/usr/bin",
        "CUDA_VISIBLE_DEVICES": "1",
        "X": "y",
        "YOLO_OFFLINE": "1",
        "VIGILD_SHARED": "/srv",
    }
    assert not set(THREAD_VARIABLES) & set(env)


# A benchmark parent as bench/throughput.py runs one: it imports ultralytics (bench_weights does, which sets
# OMP_NUM_THREADS=1 in its environment), then measures a contender in a fresh process; the contender reports the
# thread variables it was started with and the threads torch and OpenCV used.
PARENT = """
import argparse, json, os, sys
sys.path.insert(0, {bench!r})
import throughput
import ultralytics
assert os.environ.get("OMP_NUM_THREADS") == "1", "ultralytics no longer sets OMP_NUM_THREADS: this test proves nothing"
args = argparse.Namespace(
    video={video!r}, weights="yolov8n.yaml", conf=0.25, imgsz=[320, 320], device="cpu", seconds=0.5, warmup=0,
    max_batch=1, capture="opencv", half=None,
)
print(json.dumps(throughput.in_subprocess("ceiling", args, 1)))
"""


@pytest.mark.e2e
def test_throughput_contender_inherits_no_thread_setting_from_the_parent(tmp_path):
    script = PARENT.format(bench=str(ROOT / "bench"), video=str(VTEST))
    env = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    env.update(YOLO_OFFLINE="1", VIGILD_BENCH_CACHE=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["inherited_thread_env"] == {}
    # the ceiling measures vigild's device path with the threads the daemon would take
    cpus = independent_usable_cpus()
    assert result["threads"] == {"torch": cpus, "opencv": cpus}
    assert result["device_fps"] > 0
