"""The event journal's files (vigild.outputs.journal): where they live, with which modes, and what a start removes.

- The journal lives in the state directory (vigild.paths.state_dir, docs/service.md#the-state-directory) unless
  `journal.path` moves it. Its directory, when vigild makes it, and its `snapshots/` directory are owner-only
  (0700; 0750 under the unit, where the `vigild` group reads the journal): made so, or tightened with a log line.
- The database, its WAL and SHM (SQLite gives them the database's mode), the lock and every snapshot are 0600
  (0640 under the unit) from their creation; one a former run left wider is tightened.
- Nothing follows a symbolic link: a `snapshots` directory, lock file or database that is a link, or one of another
  user, is refused with an error naming it, and the start-up sweep removes only regular files named as the journal
  names them (`<seq>-<32 hex>.jpg`, and their `.part` temporaries), so a journal in a shared directory never takes
  a file it did not write.
- Readers open the database by a percent-quoted `file:` URI: a `#` or `?` in the path is part of the name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import sqlite3
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from vigild import paths

log = logging.getLogger("vigild.journal")

SNAPSHOTS = "snapshots"
DATABASE = "journal.db"
SNAPSHOT_FILE = re.compile(r"-?[0-9]+-[0-9a-f]{32}\.jpg(\.part)?")
"""The names `snapshot_name` gives, and their temporaries: all the sweep ever removes."""


class JournalLocked(Exception):
    """Another process has the journal open for writing."""


def default_path(config_file: Path | None, environ: Mapping[str, str] | None = None) -> Path:
    """Where the journal of the daemon run with `config_file` lives when `journal.path` is not set: journal.db in
    its state directory (vigild.paths.state_dir: $STATE_DIRECTORY under systemd, else one directory per config file
    under the XDG state home), so that two configs never share a journal and the same config finds its own again."""
    return paths.state_dir(config_file, environ) / DATABASE


def snapshot_name(seq: int, event_id: str) -> str:
    """The file name of an event's snapshot: from its seq (an int) and id (32 hex digits), checked, so that nothing
    in an event can name a path outside the snapshots directory."""
    if not isinstance(seq, int) or isinstance(seq, bool) or not (
        isinstance(event_id, str) and len(event_id) == 32 and all(c in "0123456789abcdef" for c in event_id)
    ):
        raise ValueError(f"not an event's seq and id: {seq!r}, {event_id!r}")
    return f"{seq}-{event_id}.jpg"


def uri(path: Path | str, mode: str = "ro") -> str:
    """The SQLite URI of the database at `path`, percent-quoted (`file:///…/cams%232/journal.db?mode=ro`)."""
    return f"{Path(path).absolute().as_uri()}?mode={mode}"


def open_read_only(path: Path) -> sqlite3.Connection:
    """A reader's connection (`vigild events`, replay): never writes, never takes the writer's lock."""
    return sqlite3.connect(uri(path), uri=True)


def prepare_directories(path: Path) -> Path:
    """Make or check the directory of the journal at `path` and its snapshots directory; return the latter.

    A directory of another user that `journal.path` names (a shared one) is used as it is: the journal's own files
    and directory in it are private, and checked."""
    directory = path.parent
    try:
        theirs = directory.stat().st_uid != os.getuid()
    except FileNotFoundError:
        theirs = False
    if not theirs:
        paths.private_dir(directory)
    snapshots = directory / SNAPSHOTS
    mode = paths.dir_mode()
    with contextlib.suppress(FileExistsError):
        os.mkdir(snapshots, mode)
        os.chmod(snapshots, mode, follow_symlinks=False)  # exactly `mode`, whatever the umask
    info = os.lstat(snapshots)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a directory"
        raise OSError(f"{snapshots} is {kind}: the journal keeps its snapshots in a directory of its own there and "
                      "follows no link; remove it, or set journal.path to a directory of the journal's own")  # fmt: skip
    if info.st_uid != os.getuid():
        raise OSError(f"{snapshots} belongs to another user (uid {info.st_uid}), not to this daemon: give the "
                      "journal a directory of its own (journal.path)")  # fmt: skip
    current = stat.S_IMODE(info.st_mode)
    if current & ~mode:
        os.chmod(snapshots, current & mode)
        log.warning("%s was open to other users (mode %04o): tightened to %04o", snapshots, current, current & mode)
    return snapshots


def private_file(path: Path, create: bool = True) -> int | None:
    """Open `path` read-write, never through a symbolic link, created with the journal's file mode; one of another
    user is refused, one of ours that is wider is tightened. Without `create`, None when there is none."""
    mode = paths.file_mode()
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, mode)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(f"{path} is a symbolic link: the journal follows none; remove it") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file; the journal needs it for itself")
        if info.st_uid != os.getuid():
            raise OSError(f"{path} belongs to another user (uid {info.st_uid}): give the journal a directory of its "
                          "own (journal.path)")  # fmt: skip
        if stat.S_IMODE(info.st_mode) & ~mode:
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def prepare_database(path: Path) -> None:
    """Create the database file with the journal's mode (SQLite then gives its WAL and SHM the same), and tighten
    the WAL and SHM a former run left wider."""
    fd = private_file(path)
    assert fd is not None  # created
    os.close(fd)
    for suffix in ("-wal", "-shm"):
        fd = private_file(path.with_name(path.name + suffix), create=False)
        if fd is not None:
            os.close(fd)


def take_lock(path: Path) -> IO[str]:
    """Lock the journal at `path` for writing (`flock` on `<path>.lock`, which holds the writer's pid): raise
    `JournalLocked` naming the holder when another process has it."""
    fd = private_file(path.with_name(path.name + ".lock"))
    assert fd is not None  # created
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise JournalLocked(
            f"the event journal {path} is in use by another vigild (pid {holder}): give each daemon a journal of "
            "its own (journal.path)"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def write_file(path: Path, data: bytes) -> None:
    """Write `data` whole, with the journal's file mode: under a temporary name, renamed into place (a reader never
    sees half a JPEG)."""
    temporary = path.with_name(path.name + ".part")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, paths.file_mode())
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def sweep(snapshots: Path, known: set[str]) -> int:
    """Remove the snapshot files (and temporaries) in `snapshots` that are not in `known`: only regular files named
    as the journal names them, through no symbolic link; return how many."""
    fd = os.open(snapshots, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    swept = 0
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.name in known or not SNAPSHOT_FILE.fullmatch(entry.name):
                    continue
                if entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
                        swept += 1
    finally:
        os.close(fd)
    return swept


__all__ = [
    "DATABASE",
    "SNAPSHOTS",
    "JournalLocked",
    "default_path",
    "open_read_only",
    "prepare_database",
    "prepare_directories",
    "private_file",
    "snapshot_name",
    "sweep",
    "take_lock",
    "uri",
]
