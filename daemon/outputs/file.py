"""The file output (`outputs: [{type: file, path: ...}]`): every event's wire JSON, one per line (JSON Lines),
appended to a file, catching up from the journal after a stop (vigild.outputs.catchup).

A line is the event exactly as published (its snapshot's JPEG is not written; the `snapshot` field describes it).
Where the journal has nothing to catch up with, the output writes a gap notice instead, a line without `seq`:
`{"gap":{"first":120,"last":135,"reason":"retention"}}`. The file is opened for appending (created 0640, never
through a symbolic link), so `logrotate`'s `copytruncate` works; each batch is flushed (and synced with `fsync`)
before the output's cursor moves past it: a crash may write a batch twice, never skip one.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import IO

from vigild.config.outputs import FileOutputConfig
from vigild.outputs.catchup import CatchUpOutput, Delivery, JournalLink

FILE_MODE = 0o640


def open_for_append(path: Path) -> IO[bytes]:
    """`path` opened for appending, created owner read-write, group read; OSError naming it, also for a symbolic
    link or anything that is not a regular file."""
    # O_NONBLOCK: a FIFO without a reader fails here instead of blocking the output's thread
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags, FILE_MODE)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def check_appendable(path: Path) -> None:
    """What `open_for_append(path)` would refuse, without creating the file (a reload refused later leaves nothing
    behind): OSError with the reason. An existing file is opened (and closed); for a new one, its directory must be
    there and writable."""
    if os.path.lexists(path):
        open_for_append(path).close()
        return
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"{directory} is not writable by this user")


class FileOutput(CatchUpOutput):
    def __init__(self, config: FileOutputConfig, journal: JournalLink | None):
        super().__init__(config.name, config.queue_size, journal if config.catch_up else None)
        self.config = config
        self._file: IO[bytes] | None = None

    def open(self) -> None:
        self._file = open_for_append(self.config.path)
        super().open()

    def close(self) -> None:
        super().close()
        if self._file is not None:
            self._file.close()

    def send(self, deliveries: list[Delivery]) -> None:
        assert self._file is not None
        self._file.write(b"".join(d.body + b"\n" for d in deliveries))

    def gap(self, first: int, last: int, reason: str) -> None:
        assert self._file is not None
        line = json.dumps({"gap": {"first": first, "last": last, "reason": reason}}, separators=(",", ":"))
        self._file.write(line.encode() + b"\n")

    def flush(self) -> bool:
        assert self._file is not None
        self._file.flush()
        if self.config.fsync:
            os.fsync(self._file.fileno())
        return True
