"""One way to run a child process of vigild: the capture workers (vigild.capture.worker) and branch processes
(vigild.pipeline.branch_process) both start, talk to, restart and stop their children through this module.

- **spawn**: `python -P -m <module> <fd> [args]` with one end of a socket pair (and any other descriptors the child
  needs) and stdin closed; `-P`: nothing from the daemon's working directory is imported before the daemon's own
  `sys.path` arrives. The parent then sends `sys.path` and the child's `hello` (a dataclass); the child reads both
  with `accept()`.
- **messages** are dataclasses (frozen, with slots), pickled over the socket: typed, never positional tuples. A
  child module's `if __name__ == "__main__"` imports its own `main` from its real name and runs that, so that the
  classes it sends pickle as `vigild...Class`, not `__main__.Class`.
- **restart with backoff**: `Backoff` says how long to wait before the next start after a child died, doubling
  while children die young and starting over once one lived `stable_s`.
- **stop**: the child is sent `Stop()`, given `timeout` seconds to exit, then killed (SIGKILL).
- **status**: `pid`, `alive`, and `describe_exit` for what ended one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any


@dataclass(frozen=True, slots=True)
class Stop:
    """To a child: finish what it holds and exit."""


class ChildGone(RuntimeError):
    """The child's socket closed (it exited or was killed)."""


def describe_exit(code: int | None) -> str:
    """What ended a child, for the log: `exit status 3`, `killed by SIGKILL`."""
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class Backoff:
    """How long to wait before starting a child again: `initial`, doubling for each child that died within
    `stable_s` of its start, at most `maximum`."""

    def __init__(self, initial: float, maximum: float, stable_s: float):
        self.initial, self.maximum, self.stable_s = initial, maximum, stable_s
        self._failures = 0

    def after(self, lived_s: float) -> float:
        """The wait after a child that lived `lived_s` seconds died."""
        self._failures = 1 if lived_s >= self.stable_s else self._failures + 1
        return min(self.maximum, self.initial * 2 ** (self._failures - 1))

    def failed_start(self, delay: float) -> float:
        """The wait after a start that failed, `delay` having been waited."""
        return min(self.maximum, max(self.initial, delay * 2))


class Child:
    """One child process and its socket (see the module). Thread-safe `send`; `recv` and `poll` from one thread."""

    def __init__(self, module: str, *, args: Sequence[str] = (), pass_fds: Sequence[int] = (),
                 env: Mapping[str, str] | None = None):  # fmt: skip
        self.module = module
        self.args = tuple(args)
        self.pass_fds = tuple(pass_fds)
        self.env = dict(env) if env is not None else None
        self.process: subprocess.Popen[bytes] | None = None
        self.connection: Connection | None = None
        self._send_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self, hello: object) -> None:
        """Start the child and send it `sys.path` and `hello`; on any failure nothing is left running and the
        error is raised (OSError: no process could be made; what pickling `hello` raised)."""
        parent, child = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-P", "-m", self.module, str(child.fileno()), *self.args],
                pass_fds=(child.fileno(), *self.pass_fds),
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        connection = Connection(parent.detach())
        try:
            connection.send(list(sys.path))
            connection.send(hello)
        except BaseException:  # (a hello that would not pickle): no half-told child is left running
            connection.close()
            process.kill()
            process.wait()
            raise
        self.process, self.connection = process, connection

    def send(self, message: object) -> None:
        """ChildGone if its socket is closed."""
        connection = self.connection
        if connection is None:
            raise ChildGone("no child")
        try:
            with self._send_lock:
                connection.send(message)
        except OSError as exc:
            raise ChildGone(str(exc)) from exc

    def recv(self) -> Any:
        """The next message; ChildGone once the socket closed."""
        connection = self.connection
        if connection is None:
            raise ChildGone("no child")
        try:
            return connection.recv()
        except (EOFError, OSError) as exc:
            raise ChildGone(str(exc) or "its socket closed") from exc

    def poll(self, timeout: float) -> bool:
        connection = self.connection
        return connection is not None and connection.poll(timeout)

    def wait(self, timeout: float | None = None) -> int | None:
        """Its exit code once it exits within `timeout` (None: not yet)."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
        return process.wait()

    def stop(self, timeout: float, ask: bool = True) -> int | None:
        """Send `Stop()` (unless `ask` is false: it was told already), wait up to `timeout`, then kill; the exit
        code. The socket is closed."""
        if ask:
            with contextlib.suppress(ChildGone):
                self.send(Stop())
        code = self.wait(timeout)
        if code is None:
            code = self.kill()
        self.close()
        return code

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()


def accept(argv: Sequence[str]) -> tuple[Connection, Any]:
    """The child's side of `spawn`: its socket (from `argv[1]`), with `sys.path` set as the daemon's, and the hello."""
    connection = Connection(int(argv[1]))
    sys.path[:] = connection.recv()
    return connection, connection.recv()


def exit_now() -> None:
    """End the child: flush its output and exit at once (threads a plugin or a library left behind must not hold
    the process)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
