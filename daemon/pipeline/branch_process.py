"""A branch in a process of its own (`branch: process`): for a plugin whose work holds the interpreter (pure Python
between frames), which on a thread would take the interpreter from the chain.

`ProcessPlugin` stands in the chain for the plugin. Its branch (vigild.pipeline.branch) calls it as it would call the
plugin, on the branch's thread, and each call goes to a child process (`python -P -m vigild.pipeline.branch_process`,
over a socket pair, as the capture workers do; -P: nothing from the daemon's working directory is imported before
the daemon's own `sys.path` arrives) that builds the real plugin from its config and runs it. Frames go
over the socket pickled (their image copied: at a branch's rate, the newest frame of each camera while it keeps up,
a small cost beside a slow plugin's work); their events come back with what the plugin raised (`FrameErrors` or an
exception), so the chain reports failures as for any plugin and publishes the events of every frame.

The child runs at nice +`NICE` with half the chain's torch threads, like a branch thread, and ignores SIGINT and
SIGTERM: the daemon stops it (it runs the plugin's `stop` and exits; if it does not within `STOP_WAIT_S` it is
killed). A child that dies (killed, a crash in native code) costs the batch it held: the call raises, the chain
reports that batch's frames as failed, and the next call starts a new child (the plugin's state starts afresh;
logged). A camera-set change on reload goes to the child before its next call. The child's pid is in the status
(`plugins.<id>.branch.pids`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from vigild.events import Event
from vigild.frame import Frame
from vigild.pipeline.branch import branch_threads, lower_priority
from vigild.plugin import FrameErrors, Plugin, PluginConfig, PluginContext

log = logging.getLogger("vigild.branch")

STOP_WAIT_S = 5.0
RESTART_DELAY_S = 1.0
"""Before a new child after one died: a plugin that kills its process on every frame does not spin the CPU."""


@dataclass(frozen=True)
class Hello:
    """The first message to a child, after `sys.path` (so that it can import the plugin's class)."""

    name: str
    cls: type[Plugin[Any]]
    config: PluginConfig
    device: str
    cameras: dict[str, Any]
    threads: int | None
    log_level: str


class ChildDied(RuntimeError):
    """The branch's process ended while it held a call: that call's frames fail."""


class ProcessPlugin(Plugin[PluginConfig]):
    """The chain's stand-in for a plugin that runs in a process of its own (see the module's docstring)."""

    Config = PluginConfig

    def __init__(self, cls: type[Plugin[Any]], name: str, config: PluginConfig, context: PluginContext):
        self._cameras_sent: Mapping[str, Any] | None = None
        super().__init__(config, context)
        self.cls = cls
        self.name = name
        # how the chain calls the stand-in: as it would call the plugin (class variables, set per instance here)
        self.batched = cls.batched  # type: ignore[misc]
        self.repeatable = cls.repeatable  # type: ignore[misc]
        self.threads = branch_threads(context.torch_threads)
        self._connection: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._died_at = -RESTART_DELAY_S
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    # ----- the Plugin interface, each a call into the child

    def start(self) -> None:
        with self._lock:
            self._spawn()

    def process(self, frames: list[Frame]) -> None:
        events, raised = self._call("process", frames)
        for frame, made in zip(frames, events, strict=True):
            frame.events.extend(made)
        if raised is not None:
            raise raised

    def on_source_end(self, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        events, raised = self._call("on_source_end", camera, ts_wall, frame_index)
        if raised is not None:
            raise raised
        return list(events)

    def check_cameras(self, cameras: Mapping[str, Any]) -> None:
        """Asked by a reload: the child's answer, unless it is busy longer than `STOP_WAIT_S` (then accepted, with
        a warning: a stuck plugin must not hold up the reload)."""
        if not self._lock.acquire(timeout=STOP_WAIT_S):
            log.warning("branch %s is busy: its process was not asked whether it can serve the new cameras", self.name)
            return
        try:
            _, raised = self._call_locked("check_cameras", dict(cameras))
        finally:
            self._lock.release()
        if raised is not None:
            raise raised

    def kill(self) -> None:
        """A branch stuck inside its plugin at stop: its process is killed (a thread could not be)."""
        process = self._process
        if process is not None and process.poll() is None:
            log.warning("branch %s: killing its process (pid %d), stuck in the plugin", self.name, process.pid)
            process.kill()
            process.wait()

    def stop(self) -> None:
        with self._lock:
            connection, process = self._connection, self._process
            self._connection = self._process = None
            if connection is None or process is None:
                return
            with contextlib.suppress(OSError, EOFError):
                connection.send(("stop", ()))
                if connection.poll(STOP_WAIT_S):
                    connection.recv()
            connection.close()
            try:
                process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("branch %s: its process (pid %d) did not exit; killing it", self.name, process.pid)
                process.kill()
                process.wait()

    # ----- the child's side, seen from here

    def _call(self, method: str, *args: Any) -> tuple[Any, BaseException | None]:
        """Run `method` in the child: (what it returned, what it raised or None). A dead child is started again
        first; one that dies during the call raises `ChildDied`."""
        with self._lock:
            return self._call_locked(method, *args)

    def _call_locked(self, method: str, *args: Any) -> tuple[Any, BaseException | None]:
        """`_call` with `_lock` held."""
        if self._connection is None or self._process is None or self._process.poll() is not None:
            self._restart()
        assert self._connection is not None and self._process is not None
        try:
            if self.context.cameras is not self._cameras_sent:  # a reload handed it other cameras
                self._connection.send(("cameras", (dict(self.context.cameras),)))
                self._cameras_sent = self.context.cameras
            self._connection.send((method, args))
            return self._connection.recv()
        except (EOFError, OSError) as exc:
            process = self._process
            code = process.wait()
            self._forget()
            raise ChildDied(f"its process (pid {process.pid}) ended (exit code {code})") from exc

    def _restart(self) -> None:
        if self._process is not None:
            code = self._process.wait()
            log.error("branch %s: its process (pid %d) ended (exit code %s); starting a new one", self.name,
                      self._process.pid, code)  # fmt: skip
            self._forget()
        time.sleep(max(0.0, self._died_at + RESTART_DELAY_S - time.monotonic()))
        self.restarts += 1
        try:
            self._spawn()
        except Exception:  # (a plugin that no longer starts: tried again a second later at the soonest)
            self._died_at = time.monotonic()
            raise

    def _forget(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection, self._process, self._died_at = None, None, time.monotonic()

    def _spawn(self) -> None:
        """With `_lock` held: a child with the plugin built and started, or raise what stopped it."""
        parent, child = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-P", "-m", "vigild.pipeline.branch_process", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=thread_environment(self.threads),
            )
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        connection = Connection(parent.detach())
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        cameras = dict(self.context.cameras)
        try:
            connection.send(list(sys.path))
            connection.send(Hello(self.name, self.cls, self.config, self.context.device, cameras, self.threads, level))
            status, value = connection.recv()
        except (EOFError, OSError) as exc:
            connection.close()
            raise ChildDied(f"its process (pid {process.pid}) ended as it started (exit code {process.wait()})") from exc
        except BaseException:  # (the config or class would not pickle): the child waits for its Hello, ended here
            connection.close()
            process.kill()
            process.wait()
            raise
        if status != "ready":
            connection.close()
            process.wait()
            raise value
        self._connection, self._process, self._cameras_sent = connection, process, self.context.cameras
        log.info("branch %s runs in process %d", self.name, process.pid)


def thread_environment(threads: int | None) -> dict[str, str]:
    """The child's environment: the daemon's, with the OpenMP thread count of the branch, so torch starts with it
    whenever the plugin imports it (`lower_priority` sets it only where torch is imported already)."""
    environment = dict(os.environ)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = environment["MKL_NUM_THREADS"] = str(threads)
    return environment


def portable(exc: BaseException) -> BaseException:
    """`exc` as it can cross to the daemon: itself if it pickles, else a RuntimeError with its type and message
    (a `FrameErrors` keeps its frames, each error made portable)."""
    if isinstance(exc, FrameErrors):
        return FrameErrors({position: portable(error) for position, error in exc.errors.items()})  # type: ignore[misc]
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def serve(connection: Connection, hello: Hello) -> None:
    """The child's loop: build and start the plugin, then answer calls until `stop` or the daemon goes."""
    lower_priority(hello.threads)  # the main thread's, which the plugin's own threads inherit
    try:
        plugin = hello.cls(hello.config, PluginContext(hello.device, hello.cameras, hello.threads))
        plugin.start()
    except Exception as exc:
        connection.send(("failed", portable(exc)))
        return
    lower_priority(hello.threads)  # again: starting may have imported torch (and ultralytics sets its threads)
    connection.send(("ready", os.getpid()))
    while True:
        try:
            method, args = connection.recv()
        except EOFError:  # the daemon is gone
            return
        if method == "stop":
            try:
                plugin.stop()
            except Exception:
                log.exception("branch %s: the plugin failed to stop cleanly", hello.name)
            connection.send((None, None))
            return
        if method == "cameras":
            plugin.context = replace(plugin.context, cameras=args[0])
            continue
        if method == "process":
            frames: list[Frame] = args[0]
            try:
                plugin.process(frames)
                raised = None
            except Exception as exc:
                raised = portable(exc)
            connection.send(([frame.events for frame in frames], raised))
            continue
        try:
            connection.send((getattr(plugin, method)(*args), None))
        except Exception as exc:
            connection.send((None, portable(exc)))


def main(argv: list[str]) -> int:
    # the daemon decides when its branch processes stop (not a Ctrl-C at the terminal, nor systemd's SIGTERM to the
    # whole cgroup: the daemon stops its branches first); if the daemon dies, the socket closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    connection = Connection(int(argv[1]))
    sys.path[:] = connection.recv()
    hello: Hello = connection.recv()
    logging.basicConfig(
        level=hello.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s[branch {hello.name}]: %(message)s",
        stream=sys.stderr,
    )
    serve(connection, hello)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # threads a plugin left behind must not hold the process


if __name__ == "__main__":
    sys.exit(main(sys.argv))
