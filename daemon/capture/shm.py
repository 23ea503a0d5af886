"""Frames in POSIX shared memory between capture workers and the inference process, and the record that lets a
later start remove what a killed daemon left.

A **segment** holds one camera's frames of one size: a header of slot states, then `slots` frames of (H, W, 3)
uint8. A worker makes it when a camera's first frame (or a frame of a new size) arrives and unlinks it when the
camera stops or changes size; the daemon maps it on the first frame that names it. Each slot is in one of three
states, each moved by one side only:

- FREE → SENT: the worker wrote a frame into it and sends its number over the worker's socket;
- SENT → TAKEN: the daemon's scheduler took the frame from the exchange (only cameras that wait for the consumer,
  `realtime: false` files, need this: their worker sends the next frame once the previous one is taken);
- SENT/TAKEN → FREE: the daemon let go of the frame: nothing refers to its image any more (see `FrameLease`).

**Ownership rule**: a frame's image is a read-only view into its slot, valid for as long as anything holds that
array or a view of it (the exchange, the batch in the chain, the scheduler's latest frame for snapshots, a plugin's
last frame); the slot returns to the worker when the last reference goes. A plugin that keeps pixels for longer
than that (a clip, a crop) keeps a copy, as it must with any frame.

Segments are files in /dev/shm (what `shm_open` makes on Linux), opened directly rather than through
`multiprocessing.shared_memory`: on Python 3.11 that registers every segment, even one only attached to, with a
resource-tracker process that unlinks them when it exits and warns about "leaks" that are not. Names carry the
daemon's instance id, so daemons side by side (in other network namespaces too, which share /dev/shm) never touch
each other's, and a cleanup removes exactly one instance's segments.

/dev/shm is writable by every local user, so nothing there is trusted: each segment's name ends in 64 random bits
(another user who reads the directory cannot plant the next one; a name taken anyway is drawn again), a segment is
created with O_EXCL and mapped only when it is a regular file of the daemon's own user, and a cleanup unlinks only
files of its own user: a planted file with one of our names is left where it is, logged, and never an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import mmap
import os
import secrets
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

log = logging.getLogger("vigild.capture")

SHM_DIR = Path("/dev/shm")
PREFIX = "vigild-"
HEADER_BYTES = 4096
"""Slot states in the first bytes; frames start on a page boundary."""
MAX_SLOTS = 64

FREE, SENT, TAKEN = 0, 1, 2


def _page_align(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def _token() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class SegmentName:
    """`vigild-<instance>-w<worker>.<generation>-c<capture>.<sequence>.<token>`: whose it is, readable in /dev/shm;
    the random token makes it unguessable."""

    instance: str
    worker: int
    generation: int
    capture: int
    sequence: int
    token: str = field(default_factory=_token)

    def __str__(self) -> str:
        prefix = worker_prefix(self.instance, self.worker, self.generation)
        return f"{prefix}c{self.capture}.{self.sequence}.{self.token}"


def instance_prefix(instance: str) -> str:
    return f"{PREFIX}{instance}-"


def worker_prefix(instance: str, worker: int, generation: int) -> str:
    """Every segment one run of one worker makes starts with this."""
    return f"{instance_prefix(instance)}w{worker}.{generation}-"


class Segment:
    """One mapping of a segment, in the worker that made it or the daemon that reads it."""

    def __init__(self, name: str, fd: int, shape: tuple[int, int, int], slots: int):
        self.name = name
        self.shape = shape
        self.slots = slots
        self.frame_bytes = shape[0] * shape[1] * shape[2]
        self.stride = _page_align(self.frame_bytes)
        try:
            self._mmap = mmap.mmap(fd, HEADER_BYTES + slots * self.stride)
        finally:
            os.close(fd)
        self.view = memoryview(self._mmap)
        self._address: int | None = None
        self.states = np.ndarray((slots,), np.uint8, buffer=self.view[:slots])

    @classmethod
    def create(cls, name: str, shape: tuple[int, int, int], slots: int) -> Segment:
        """Worker side: a new segment, owner-only, every slot FREE."""
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be 1..{MAX_SLOTS}")
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            # allocated now: a full /dev/shm is an OSError here (the camera retries), never a SIGBUS at a later write
            os.posix_fallocate(fd, 0, HEADER_BYTES + slots * _page_align(shape[0] * shape[1] * shape[2]))
        except OSError:
            os.close(fd)
            unlink(name)
            raise
        return cls(name, fd, shape, slots)

    @classmethod
    def create_new(cls, name: SegmentName, shape: tuple[int, int, int], slots: int, tries: int = 8) -> Segment:
        """`create` under `name` with a fresh token, drawn again while the name is taken (planted by someone)."""
        for attempt in range(tries):
            try:
                return cls.create(str(name if attempt == 0 else replace(name, token=_token())), shape, slots)
            except FileExistsError:
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def attach(cls, name: str, shape: tuple[int, int, int], slots: int, prefix: str) -> Segment:
        """Daemon side: map a segment a worker made (it may have been unlinked since: then FileNotFoundError).

        What the worker says is checked before anything is mapped: the name must start with that worker's `prefix`
        (never a path), the layout must be a frame's, and the file must be as large as the layout says (a smaller
        one would be a SIGBUS at the first read). Anything else is a ValueError."""
        if not name.startswith(prefix) or "/" in name or "\0" in name:
            raise ValueError(f"not a segment of this worker: {name!r}")
        height, width, channels = shape
        if not (1 <= slots <= MAX_SLOTS and height > 0 and width > 0 and channels == 3):
            raise ValueError(f"not a frame layout: {slots} slots of {shape}")
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            os.close(fd)
            raise ValueError(f"segment {name} is not a file of this user's (owner uid {info.st_uid})")
        if info.st_size < HEADER_BYTES + slots * _page_align(height * width * channels):
            os.close(fd)
            raise ValueError(f"segment {name} is smaller than {slots} slots of {shape}")
        return cls(name, fd, shape, slots)

    def image(self, slot: int) -> np.ndarray:
        """Worker side: a writable (H, W, 3) view of `slot`."""
        start = HEADER_BYTES + slot * self.stride
        return np.ndarray(self.shape, np.uint8, buffer=self.view[start : start + self.frame_bytes])

    def lease(self, slot: int) -> FrameLease:
        """Daemon side: the read-only image of `slot`, as an object whose life is the frame's (see FrameLease)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"segment {self.name} has no slot {slot}")
        if self._address is None:
            self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._mmap))
        return FrameLease(self, self._address + HEADER_BYTES + slot * self.stride)

    def free_slot(self) -> int | None:
        free = np.flatnonzero(self.states == FREE)
        return int(free[0]) if free.size else None


class FrameLease:
    """The owner of one frame's pixels in a daemon-side segment: `np.asarray(lease)` is a read-only (H, W, 3) view of
    the slot whose `base` is the lease, so every array made from it (slices, `torch.as_tensor`) keeps it alive, and
    `weakref.finalize(lease, ...)` runs when the last of them is gone: that gives the slot back. A plain
    memoryview cannot do this: numpy's `base` skips past it to the mmap, which all frames of the segment share."""

    __slots__ = ("__array_interface__", "__weakref__", "segment")

    def __init__(self, segment: Segment, address: int):
        self.segment = segment  # keeps the mapping alive as long as the frame
        self.__array_interface__ = {"shape": segment.shape, "typestr": "|u1", "data": (address, True), "version": 3}


def unlink(name: str) -> bool:
    """Remove the segment `name` if it is a file of this user's; whether it was removed. Never raises: a file of
    another user (planted under one of our names), one this user may not remove, or any other error is logged and
    left where it is (root may remove anyone's file: the owner check keeps it from doing so)."""
    path = SHM_DIR / name
    try:
        owner = os.lstat(path).st_uid
        if owner != os.geteuid():
            log.warning("shared memory: %s belongs to uid %d, not this daemon's user: left alone", path, owner)
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:  # PermissionError included: a cleanup goes on with the next file
        log.warning("shared memory: cannot remove %s: %s", path, exc)
        return False
    return True


def unlink_prefix(prefix: str) -> list[str]:
    """Remove every segment of this user's whose name starts with `prefix`; the names removed. Never raises."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return [name for name in names if name.startswith(prefix) and unlink(name)]


def new_instance_id() -> str:
    return secrets.token_hex(6)


class InstanceRecord:
    """`<runtime dir>/shm/<instance>.json`, locked (flock) for as long as the daemon lives.

    It names the instance's segment prefix. A start tries each record's lock: one it gets belongs to a daemon that is
    gone (killed, crashed; the kernel drops a dead process's locks), so its segments are removed and the record with
    them. A record whose lock is held belongs to a daemon still running, here or in another network namespace, and is
    left alone.
    """

    def __init__(self, directory: Path, instance: str):
        self.directory = directory
        self.instance = instance
        self.path = directory / f"{instance}.json"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Write the record under a name no cleanup looks at, lock it, then rename it into place: another daemon's
        start never sees it unlocked."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = self.directory / f".{self.instance}.new"
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = {
            "instance": self.instance,
            "pid": os.getpid(),
            "prefix": instance_prefix(self.instance),
            "shm_dir": str(SHM_DIR),
            "started": time.time(),
        }
        os.write(fd, json.dumps(record).encode() + b"\n")
        os.rename(partial, self.path)
        self._fd = fd

    def release(self) -> None:
        """Clean stop: every segment of this instance goes, then the record."""
        unlink_prefix(instance_prefix(self.instance))
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


def remove_stale(directory: Path) -> list[str]:
    """Remove what dead instances recorded in `directory` left; the segments removed. Live instances are untouched."""
    removed: list[str] = []
    try:
        entries = sorted(directory.glob("*.json"))
    except OSError:
        return removed
    for path in entries:
        instance = path.stem
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, or not a record this user may lock
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a daemon that is running holds it
            gone = unlink_prefix(instance_prefix(instance))
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            removed.extend(gone)
            log.warning(
                "removed %d shared-memory segment(s) left by vigild instance %s, which did not stop cleanly",
                len(gone),
                instance,
            )
        finally:
            os.close(fd)
    return removed
