"""Where vigild keeps its files: one rule, written down in docs/service.md#the-state-directory.

- The **state directory** holds what outlives a run: the journal (`journal.path` moves only the journal), output
  cursors, and what later parts add (the web console's token and edits, recordings). Under systemd it is
  $STATE_DIRECTORY (the unit's StateDirectory, /var/lib/vigild); otherwise one per config file under the XDG state
  home: $XDG_STATE_HOME (default ~/.local/state)/vigild/<config stem>-<8 hex digits of its absolute path's SHA-1>.
- The **runtime directory** holds sockets and shared-memory records: $RUNTIME_DIRECTORY under systemd, else
  $XDG_RUNTIME_DIR/vigild, else (a container, a root shell, a CI runner: no XDG_RUNTIME_DIR) `run/` in the config's
  state directory, so that the fallback is per config file like the journal.

Every directory vigild makes is owner-only from the start (0700; 0750 under the unit, where the `vigild` group reads
the journal); one of the user's own that is wider (every run before this rule left ~/.local/state/vigild at 0755)
is tightened with a log line, not refused. A directory of another user, or a non-directory, is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

MAX_SOCKET_PATH_BYTES = 107
"""sun_path holds 108 bytes with the terminating NUL."""


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _systemd(environ: Mapping[str, str] | None, name: str) -> str:
    return _env(environ).get(name, "").split(":")[0]


def under_unit(environ: Mapping[str, str] | None = None) -> bool:
    """Run by systemd with StateDirectory= (the installed unit): the group must read what vigild writes."""
    return bool(_systemd(environ, "STATE_DIRECTORY"))


def dir_mode(environ: Mapping[str, str] | None = None) -> int:
    """The mode of every directory vigild makes: 0750 under the unit (the `vigild` group reads), else 0700."""
    return 0o750 if under_unit(environ) else 0o700


def file_mode(environ: Mapping[str, str] | None = None) -> int:
    """The mode of every file vigild writes in its state directory: 0640 under the unit, else 0600."""
    return 0o640 if under_unit(environ) else 0o600


def _xdg_root(environ: Mapping[str, str] | None) -> Path:
    """$XDG_STATE_HOME/vigild, or ~/.local/state/vigild."""
    env = _env(environ)
    home = env.get("HOME") or str(Path.home())
    return Path(env.get("XDG_STATE_HOME") or Path(home) / ".local" / "state") / "vigild"


def config_key(config_file: Path | str | None) -> str:
    """<stem>-<8 hex of the absolute path's SHA-1>: the same config always finds its own directory again, and two
    configs never share one. `default` without a config file. The stem is cut to 24 characters, so that the
    fallback socket path (`<state dir>/run/control`) fits a unix socket's 107 bytes under any ordinary HOME."""
    if config_file is None:
        return "default"
    absolute = Path(config_file).resolve()
    digest = hashlib.sha1(str(absolute).encode(), usedforsecurity=False).hexdigest()[:8]
    return f"{absolute.stem[:24]}-{digest}"


def state_dir(config_file: Path | str | None, environ: Mapping[str, str] | None = None) -> Path:
    """The state directory of the daemon run with `config_file` (see the module's docstring)."""
    systemd = _systemd(environ, "STATE_DIRECTORY")
    if systemd:
        return Path(systemd)
    return _xdg_root(environ) / config_key(config_file)


def runtime_dir(config_file: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The runtime directory (sockets, shared-memory records) of the daemon run with `config_file`."""
    systemd = _systemd(environ, "RUNTIME_DIRECTORY")
    if systemd:
        return Path(systemd)
    xdg = _env(environ).get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "vigild"
    return state_dir(config_file, environ) / "run"


def control_endpoint(config_file: Path | str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The control socket's default: ipc://<runtime directory>/control."""
    return f"ipc://{runtime_dir(config_file, environ)}/control"


def replay_endpoint(config_file: Path | str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The replay socket's default: ipc://<runtime directory>/replay (readable by the daemon's user and group)."""
    return f"ipc://{runtime_dir(config_file, environ)}/replay"


def _owned_root(path: Path, environ: Mapping[str, str] | None) -> Path | None:
    """The top of the directories below which vigild owns every level (so may tighten them), if `path` is under one:
    systemd's directories themselves are the unit's (their mode is its StateDirectoryMode=), so only what lies
    below them is vigild's; the XDG root `vigild` directory is vigild's, itself included."""
    for name in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY"):
        systemd = _systemd(environ, name)
        if systemd and (path == Path(systemd) or Path(systemd) in path.parents):
            return None if path == Path(systemd) else Path(systemd)
    env = _env(environ)
    for root in (_xdg_root(environ), Path(env["XDG_RUNTIME_DIR"]) / "vigild" if env.get("XDG_RUNTIME_DIR") else None):
        if root is not None and (path == root or root in path.parents):
            return root.parent
    return None


def _chmod_dir(directory: Path, mode: int) -> None:
    """chmod the directory itself: a symbolic link put in its place meanwhile is refused (ELOOP), never followed."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def private_dir(path: Path | str, environ: Mapping[str, str] | None = None) -> Path:
    """Make `path` (and its missing parents) owner-only, or check and tighten it: see the module's docstring.

    Raises OSError naming the directory when it is not a directory or belongs to another user."""
    path = Path(path)
    mode = dir_mode(environ)
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    for directory in missing:
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue  # made meanwhile by another process: checked below like any existing one
        _chmod_dir(directory, mode)  # exactly `mode`, whatever the umask
    root = _owned_root(path, environ)
    levels = [path] if root is None else [p for p in (path, *path.parents) if p == root or root in p.parents][:-1]
    for directory in levels or [path]:
        info = directory.stat()
        if not stat.S_ISDIR(info.st_mode):
            raise OSError(f"{directory} is not a directory; vigild needs a directory of its own there")
        if info.st_uid != os.getuid():
            raise OSError(f"{directory} belongs to another user (uid {info.st_uid}); vigild needs a directory of its own")
        current = stat.S_IMODE(info.st_mode)
        if root is not None and current & ~mode:
            os.chmod(directory, current & mode)  # through a link the user made: its target was checked above
            log.warning("%s was open to other users (mode %04o): tightened to %04o", directory, current, current & mode)
    return path


def socket_path_fits(path: Path) -> None:
    """Raise OSError (naming the path and what to do) when `path` is too long for a unix socket."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise OSError(
            f"the socket path {path} is {size} bytes, over the {MAX_SOCKET_PATH_BYTES} a unix socket allows; "
            "set XDG_RUNTIME_DIR, or give the endpoint explicitly in the config"
        )


__all__ = [
    "MAX_SOCKET_PATH_BYTES",
    "config_key",
    "control_endpoint",
    "dir_mode",
    "file_mode",
    "private_dir",
    "replay_endpoint",
    "runtime_dir",
    "socket_path_fits",
    "state_dir",
    "under_unit",
]
