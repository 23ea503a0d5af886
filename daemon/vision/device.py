"""The compute device: which one, what it supports, and surviving running out of its memory.

A batch that does not fit in the device's memory is split in halves and retried, recursively; the largest size
that worked is remembered so that the next batches are cut to it up front (and allowed to grow again slowly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

log = logging.getLogger("vigild.device")

Item = TypeVar("Item")
Result = TypeVar("Result")


def resolve_device(device: str) -> str:
    """`auto` → `cuda:0` where torch sees a GPU, else `cpu`; `cuda` → `cuda:0`."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return "cuda:0" if device == "cuda" else device


def default_half(device: str) -> bool:
    """fp16 where it is fast (CUDA); fp32 on the CPU, where half precision is slow or unsupported."""
    return torch.device(device).type == "cuda"


def half_dtype(device: torch.device) -> torch.dtype:
    """The reduced precision of `half: true`: float16 on CUDA; bfloat16 on the CPU, which runs it fast only with
    AVX512-BF16 or AMX (a warning says so otherwise)."""
    if device.type != "cpu":
        return torch.float16
    fast = any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    if not fast:
        log.warning("half: true on a CPU without AVX512-BF16 or AMX: bfloat16 will be slower than float32")
    return torch.bfloat16


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure that a smaller batch may avoid: CUDA's OutOfMemoryError; cuBLAS and cuDNN failing to
    allocate their workspaces (plain RuntimeErrors naming the library's status, see `CUDA_LIBRARY_OOM_SIGNS`); the
    CPU's allocation failures (plain RuntimeErrors from torch's allocator and from oneDNN, which says only that it
    "could not create a primitive" when its buffers cannot be allocated)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(sign in text for sign in (*CUDA_LIBRARY_OOM_SIGNS, *CPU_OOM_SIGNS))


CPU_OOM_SIGNS = ("can't allocate memory", "out of memory", "could not create a primitive")
CUDA_LIBRARY_OOM_SIGNS = (
    "CUBLAS_STATUS_ALLOC_FAILED",  # "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
    "CUDNN_STATUS_ALLOC_FAILED",  # cuDNN 8: "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"
    "CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED",  # cuDNN 9, whose ALLOC_FAILED is an alias of this one
    "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",  # cuDNN 9: "cuDNN error: CUDNN_STATUS_INTERNAL_..."
)
"""Status names that torch puts in the message when cuBLAS or cuDNN cannot allocate (the texts of torch's
TORCH_CUDABLAS_CHECK and AT_CUDNN_CHECK, with the names cuBLAS and cuDNN 9 give their statuses). A bare
CUDNN_STATUS_INTERNAL_ERROR or CUBLAS_STATUS_EXECUTION_FAILED is not among them: those are not known to be memory,
and retrying them in halves would only hide them."""


class OomSplitter:
    """Runs `fn` on a batch; on out-of-memory, on halves of it, until the pieces fit (down to one item).

    The largest batch that fitted becomes a cap for later batches. After `GROW_AFTER` batches that fit the cap is
    raised by one; when that larger batch fails, the cap goes back to the size that worked (not to half of it) and
    the next attempt to grow waits twice as long.
    """

    GROW_AFTER = 100

    def __init__(self, name: str, device: str):
        self.name = name
        self.device = device
        self.limit: int | None = None
        """Largest batch allowed, once a batch did not fit; None until then."""
        self.splits = 0
        self._proven = 0
        """Largest batch that fitted since memory last got tighter."""
        self._fitted = 0
        self._grow_after = self.GROW_AFTER

    def __call__(self, fn: Callable[[Sequence[Item]], list[Result]], items: Sequence[Item]) -> list[Result]:
        if self.limit is None or len(items) <= self.limit:
            return self._run(fn, items)
        step = self.limit  # fixed for this call: a failure inside may lower self.limit
        out: list[Result] = []
        for start in range(0, len(items), step):
            out.extend(self._run(fn, items[start : start + step]))
        return out

    def _run(self, fn: Callable[[Sequence[Item]], list[Result]], items: Sequence[Item]) -> list[Result]:
        try:
            result = fn(items)
        except Exception as exc:
            if not is_out_of_memory(exc) or len(items) <= 1:
                raise
            # leave the handler before retrying: the traceback holds the failed attempt's tensors
        else:
            self._proven = max(self._proven, len(items))
            if self.limit is not None and len(items) >= self.limit:
                self._fitted += 1
                if self._fitted >= self._grow_after:
                    self.limit += 1
                    self._fitted = 0
            return result
        self._release()
        if 0 < self._proven < len(items):  # a size that worked before: go back to it
            if self.limit is not None and len(items) == self.limit:
                self._grow_after *= 2  # this was an attempt to grow; try again later
            self.limit = self._proven
        else:  # memory is tighter than before: halve
            self.limit = (len(items) + 1) // 2 if self.limit is None else min(self.limit, (len(items) + 1) // 2)
            self._proven = 0
        self.splits += 1
        self._fitted = 0
        log.warning(
            "%s: out of memory on %s with a batch of %d; retrying in batches of at most %d",
            self.name,
            self.device,
            len(items),
            self.limit,
        )
        return self(fn, items)

    def _release(self) -> None:
        if torch.device(self.device).type == "cuda":
            # with this splitter's device current: otherwise the CUDA calls behind empty_cache run on the thread's
            # current device (cuda:0 unless set), which can open a context on cuda:0 for a model on cuda:1
            with torch.cuda.device(self.device):
                torch.cuda.empty_cache()
