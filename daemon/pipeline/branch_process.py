"""A branch in a process of its own (`branch: process`): for a plugin whose work holds the interpreter (pure Python
between frames), which on a thread would take the interpreter from the chain.

`ProcessPlugin` stands in the chain for the plugin. Its branch (vigild.pipeline.branch) calls it as it would call the
plugin, on the branch's thread, and each call (`Call`, answered by a `Reply`) goes to a child process started with
vigild.children, as the capture workers are (`python -P -m vigild.pipeline.branch_process`), which builds the real
plugin from its config and runs it. Frames go
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
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from vigild.children import Child, ChildGone, Stop, accept, describe_exit, exit_now
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


@dataclass(frozen=True, slots=True)
class Call:
    """To the child: run the plugin's `method(*args)`; answered by a `Reply`."""

    method: str
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """From the child: what the call returned (for `process`: each frame's events) and what it raised, or None."""

    value: Any
    raised: BaseException | None


@dataclass(frozen=True, slots=True)
class SetCameras:
    """To the child: the cameras its plugin serves from now on (a reload), before the next call."""

    cameras: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Started:
    """From the child, after its hello: the plugin started (`error` None) or what stopped it."""

    pid: int
    error: BaseException | None = None


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
        self._child: Child | None = None
        self._lock = threading.Lock()
        self._died_at = -RESTART_DELAY_S
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None and child.alive else None

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
        child = self._child
        if child is not None and child.alive:
            log.warning("branch %s: killing its process (pid %s), stuck in the plugin", self.name, child.pid)
            child.kill()

    def stop(self) -> None:
        with self._lock:
            child, self._child = self._child, None
            if child is None:
                return
            with contextlib.suppress(ChildGone):
                child.send(Stop())  # it runs the plugin's `stop` and exits
            if child.wait(STOP_WAIT_S) is None:
                log.warning("branch %s: its process (pid %s) did not exit; killing it", self.name, child.pid)
            child.stop(0, ask=False)

    def call(self, method: str, *args: Any) -> tuple[Any, BaseException | None]:
        """Any other method of the plugin, in its process: (what it returned, what it raised or None)."""
        return self._call(method, *args)

    # ----- the child's side, seen from here

    def _call(self, method: str, *args: Any) -> tuple[Any, BaseException | None]:
        """Run `method` in the child: (what it returned, what it raised or None). A dead child is started again
        first; one that dies during the call raises `ChildDied`."""
        with self._lock:
            return self._call_locked(method, *args)

    def _call_locked(self, method: str, *args: Any) -> tuple[Any, BaseException | None]:
        """`_call` with `_lock` held."""
        if self._child is None or not self._child.alive:
            self._restart()
        child = self._child
        assert child is not None
        try:
            if self.context.cameras is not self._cameras_sent:  # a reload handed it other cameras
                child.send(SetCameras(dict(self.context.cameras)))
                self._cameras_sent = self.context.cameras
            child.send(Call(method, args))
            reply: Reply = child.recv()
            return reply.value, reply.raised
        except ChildGone as exc:
            code = child.wait()
            self._forget()
            raise ChildDied(f"its process (pid {child.pid}) ended ({describe_exit(code)})") from exc

    def _restart(self) -> None:
        if self._child is not None:
            code = self._child.wait()
            log.error("branch %s: its process (pid %s) ended (%s); starting a new one", self.name, self._child.pid,
                      describe_exit(code))  # fmt: skip
            self._forget()
        time.sleep(max(0.0, self._died_at + RESTART_DELAY_S - time.monotonic()))
        self.restarts += 1
        try:
            self._spawn()
        except Exception:  # (a plugin that no longer starts: tried again a second later at the soonest)
            self._died_at = time.monotonic()
            raise

    def _forget(self) -> None:
        if self._child is not None:
            self._child.close()
        self._child, self._died_at = None, time.monotonic()

    def _spawn(self) -> None:
        """With `_lock` held: a child with the plugin built and started, or raise what stopped it."""
        child = Child("vigild.pipeline.branch_process", env=thread_environment(self.threads))
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        child.spawn(Hello(self.name, self.cls, self.config, self.context.device, dict(self.context.cameras),
                          self.threads, level))  # fmt: skip
        try:
            started: Started = child.recv()
        except ChildGone as exc:
            raise ChildDied(f"its process (pid {child.pid}) ended as it started ({describe_exit(child.kill())})") from exc
        if started.error is not None:
            child.stop(STOP_WAIT_S, ask=False)
            raise started.error
        self._child, self._cameras_sent = child, self.context.cameras
        log.info("branch %s runs in process %d", self.name, started.pid)


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
    """The child's loop: build and start the plugin, then answer calls until `Stop` or the daemon goes."""
    lower_priority(hello.threads)  # the main thread's, which the plugin's own threads inherit
    try:
        plugin = hello.cls(hello.config, PluginContext(hello.device, hello.cameras, hello.threads))
        plugin.start()
    except Exception as exc:
        connection.send(Started(os.getpid(), portable(exc)))
        return
    lower_priority(hello.threads)  # again: starting may have imported torch (and ultralytics sets its threads)
    connection.send(Started(os.getpid()))
    while True:
        try:
            message = connection.recv()
        except EOFError:  # the daemon is gone
            return
        if isinstance(message, Stop):
            try:
                plugin.stop()
            except Exception:
                log.exception("branch %s: the plugin failed to stop cleanly", hello.name)
            return
        if isinstance(message, SetCameras):
            plugin.context = replace(plugin.context, cameras=message.cameras)
            continue
        assert isinstance(message, Call), message
        reply = _answer(plugin, message)
        try:
            connection.send(reply)
        except OSError:  # the daemon is gone (it exited without stopping us): nothing to answer
            return


def _answer(plugin: Plugin[Any], call: Call) -> Reply:
    """The plugin's answer to `call`: for `process`, each frame's events; what it raised, made portable."""
    if call.method == "process":
        frames: list[Frame] = call.args[0]
        try:
            plugin.process(frames)
            raised = None
        except Exception as exc:
            raised = portable(exc)
        return Reply([frame.events for frame in frames], raised)
    try:
        return Reply(getattr(plugin, call.method)(*call.args), None)
    except Exception as exc:
        return Reply(None, portable(exc))


def main(argv: list[str]) -> int:
    # the daemon decides when its branch processes stop (not a Ctrl-C at the terminal, nor systemd's SIGTERM to the
    # whole cgroup: the daemon stops its branches first); if the daemon dies, the socket closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    connection, hello = accept(argv)
    logging.basicConfig(
        level=hello.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s[branch {hello.name}]: %(message)s",
        stream=sys.stderr,
    )
    serve(connection, hello)
    exit_now()
    return 0


if __name__ == "__main__":
    # run as the imported module, not as __main__: the messages it sends pickle under their module's real name
    from vigild.pipeline.branch_process import main as module_main

    sys.exit(module_main(sys.argv))
