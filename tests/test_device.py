"""Devices: `auto` resolution and the out-of-memory policy (split, remember what fitted, grow back carefully).

The real allocation failure is tested in test_inference.py; here a batch function with a fixed capacity
(`capacity_limited`, standing in for a device's memory) checks the policy over many batches.
"""

from __future__ import annotations

import pytest
import torch

from vigild.vision.device import OomSplitter, default_half, is_out_of_memory, resolve_device


def capacity_limited(capacity: int, calls: list[int]):
    def run(items):
        calls.append(len(items))
        if len(items) > capacity:
            raise torch.OutOfMemoryError(f"{len(items)} items do not fit in {capacity}")
        return [item * 2 for item in items]

    return run


def test_a_batch_that_does_not_fit_is_split_until_it_does_and_keeps_its_order():
    splitter = OomSplitter("test", "cpu")
    calls: list[int] = []
    assert splitter(capacity_limited(5, calls), list(range(16))) == [i * 2 for i in range(16)]
    assert splitter.limit is not None and splitter.limit <= 5
    calls.clear()
    splitter(capacity_limited(5, calls), list(range(16)))
    assert max(calls) <= 5, "later batches are cut to the size that fitted, without failing first"


def test_growing_past_the_capacity_goes_back_to_what_fitted_not_to_half():
    splitter = OomSplitter("test", "cpu")
    splitter.GROW_AFTER = 3
    splitter._grow_after = 3
    calls: list[int] = []
    run = capacity_limited(12, calls)
    splitter(run, list(range(12)))
    splitter(run, list(range(24)))  # does not fit: limit 12
    assert splitter.limit == 12
    limits = []
    for _ in range(40):
        splitter(run, list(range(24)))
        limits.append(splitter.limit)
    assert min(limits) == 12, f"the limit collapsed: {limits}"
    assert max(limits) == 13, "it tried to grow"
    growth_failures = sum(1 for size in calls if size == 13)
    # 80 batches of up to 12: attempts to grow after 3, 6, 12, 24 more batches (doubling), not every 3
    assert growth_failures == 4, f"growth attempts do not back off: {growth_failures}"


def test_errors_that_are_not_out_of_memory_are_not_retried():
    splitter = OomSplitter("test", "cpu")

    def broken(items):
        raise ValueError("bad frame")

    with pytest.raises(ValueError):
        splitter(broken, [1, 2, 3])
    assert splitter.splits == 0


@pytest.mark.parametrize(
    ("exc", "oom"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), True),
        (RuntimeError("could not create a primitive"), True),
        (RuntimeError("shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
        # cuBLAS and cuDNN as torch reports them (RuntimeErrors from TORCH_CUDABLAS_CHECK and AT_CUDNN_CHECK in
        # ATen/cuda/Exceptions.h; status names as libtorch_cuda and cuDNN 9's libcudnn_graph spell them)
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),  # cuDNN 8's name
        # not known to be memory: retrying these in halves would hide a real fault
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), False),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_COMPILATION_FAILED"), False),
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                      "non-contiguous input."), False),
        (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, "
                      "n, k, &alpha, a, lda, b, ldb, &beta, c, ldc)`"), False),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    ],
)
def test_what_counts_as_out_of_memory(exc, oom):
    assert is_out_of_memory(exc) is oom


def test_the_cache_is_emptied_with_the_splitters_own_gpu_current(monkeypatch):
    """A model on cuda:1 that runs out of memory: the cache is emptied with cuda:1 the current device (else the
    CUDA calls behind it run on the thread's current device, cuda:0, and can open a context there). No GPU here:
    `torch.cuda.device` and `torch.cuda.empty_cache` are replaced by fakes that record the current device."""
    current = ["cuda:0"]
    emptied_on: list[str] = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = str(torch.device(device))

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied_on.append(current[-1]))
    splitter = OomSplitter("test", "cuda:1")
    assert splitter(capacity_limited(5, []), list(range(16))) == [i * 2 for i in range(16)]
    assert splitter.splits > 0 and emptied_on, "the batch was split, and the cache emptied before each retry"
    assert set(emptied_on) == {"cuda:1"}
    assert current == ["cuda:0"], "the thread's current device is given back"


def test_auto_device_and_default_precision_on_this_machine():
    device = resolve_device("auto")
    assert device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda") == "cuda:0"
    assert default_half("cpu") is False and default_half("cuda:0") is True
