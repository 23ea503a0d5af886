"""The session guard (conftest's hooks): the run fails when the real HOME's vigild directories or a fixed shared path
(/tmp/vigild*, /run/vigild, vigild segments in /dev/shm) changed under it, and the summary says what changed.

Every test runs with a HOME of its own (conftest.hermetic_home); a daemon or helper that still reaches a fixed path
would pass on a fresh CI runner and fail, or worse, on a user's machine. What is watched is limited to vigild's own
names and the top level of a few HOME directories, so that other programs on a shared machine (which write /tmp
and ~/.cache/pip all the time) do not set it off.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

REAL_HOME = Path(os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir)
"""The HOME pytest was started with, taken before conftest replaces it."""

HOME_LISTED = ("", ".config", ".cache", ".local", ".local/state", ".local/share")
"""Directories of the real HOME whose entries (names only) must not change: a tool that makes ~/.config/X in a test."""

HOME_VIGILD = (".local/state/vigild", ".config/vigild", ".cache/vigild", ".local/share/vigild")
"""vigild's directories in the real HOME, watched to the last file (names, modes, sizes, times)."""

SHARED_FIXED = (Path("/run/vigild"),)

OTHER_SUITES = ("vigild-tests-",)
"""/tmp names of suites run from older checkouts beside this one (before their temp dirs were renamed)."""

Snapshot = dict[str, tuple[int, int, int]]


def _tree(root: Path, into: Snapshot, label: str) -> None:
    """Every path under `root` (itself included) as label/relative -> (mode, size, mtime_ns); symlinks not followed."""
    try:
        info = root.lstat()
    except OSError:
        return
    into[label] = (info.st_mode, info.st_size if not stat.S_ISDIR(info.st_mode) else 0, info.st_mtime_ns)
    if stat.S_ISDIR(info.st_mode):
        try:
            children = sorted(os.listdir(root))
        except OSError:
            return
        for name in children:
            _tree(root / name, into, f"{label}/{name}")


def _listing(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


def snapshot(home: Path = REAL_HOME) -> Snapshot:
    found: Snapshot = {}
    for relative in HOME_LISTED:
        for name in _listing(home / relative):
            found.setdefault(f"{home / relative / name}", (0, 0, 0))  # presence only
    for relative in HOME_VIGILD:
        _tree(home / relative, found, str(home / relative))
    for path in SHARED_FIXED:
        _tree(path, found, str(path))
    for name in _listing(Path("/tmp")):
        if name.startswith("vigild") and not name.startswith(OTHER_SUITES):
            _tree(Path("/tmp") / name, found, f"/tmp/{name}")
    for name in _listing(Path("/dev/shm")):
        if name.startswith("vigild"):
            found[f"/dev/shm/{name}"] = (0, 0, 0)
    return found


def _open_anywhere(paths: set[str]) -> set[str]:
    """Which of `paths` some live process has mapped or open (a segment of a daemon running beside this suite)."""
    held: set[str] = set()
    for pid in filter(str.isdigit, _listing(Path("/proc"))):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue  # gone, or not ours to read
        held.update(path for path in paths if path in maps)
        for fd in _listing(Path(f"/proc/{pid}/fd")):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile (the listing's own descriptor, for one)
            if target in paths:
                held.add(target)
    return held


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """What differs, one line each. In /tmp and /dev/shm, which other users and programs share, only what is new
    and left behind counts (a segment only if no live process holds it): others' files come and go there."""
    shared = ("/tmp/", "/dev/shm/")
    lines = [f"removed {path}" for path in sorted(before.keys() - after.keys()) if not path.startswith(shared)]
    lines += [
        f"changed {path}"
        for path in sorted(before.keys() & after.keys())
        if before[path] != after[path] and not path.startswith(shared)
    ]
    added = after.keys() - before.keys()
    segments = {path for path in added if path.startswith("/dev/shm/")}
    added -= _open_anywhere(segments)
    lines += [f"created {path}" for path in sorted(added)]
    return lines


_state: dict[str, object] = {}


def pytest_sessionstart(session) -> None:
    _state["before"] = snapshot()


def pytest_sessionfinish(session, exitstatus) -> None:
    before = _state.get("before")
    if before is None:
        return
    found = changes(before, snapshot())  # type: ignore[arg-type]
    _state["found"] = found
    if found and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter) -> None:
    found = _state.get("found")
    if found:
        terminalreporter.section("the suite changed paths outside its own temporary directories", red=True)
        for line in found:  # type: ignore[attr-defined]
            terminalreporter.write_line(line)
