"""Pieces the service tests share: a notify socket like systemd's, a per-frame plugin, a daemon with a control socket."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import daemon_env, free_endpoint, install_fake_distribution, vigild

# A test plugin (installed as a third-party distribution would be): one `frame` event per frame it sees, so that a
# subscriber can check each camera's frame indices for gaps; while the file `hang_when` exists, it blocks in
# `process` like a stuck model (and touches `held_file`, if set, so a test knows a batch is held); `delay_s` makes
# every batch take that long, like a model; while the file `fail_start_when` exists, `start()` raises, like a model
# that will not load. It can run as a branch (`branch: true`); `kind` names its per-frame events, and with `closing`
# it sends a `closing` event when a camera closes.
FRAME_ECHO = '''
import os
import time
from typing import Literal

from vigild.events import Event
from vigild.plugin import Plugin, PluginConfig


class FrameEchoConfig(PluginConfig):
    type: Literal["frame_echo"] = "frame_echo"
    hang_when: str | None = None
    held_file: str | None = None
    delay_s: float = 0.0
    fail_start_when: str | None = None
    pad: int = 0  # bytes of filler in each event, to make a backlog show in memory
    kind: str = "frame"
    closing: bool = False


class FrameEcho(Plugin[FrameEchoConfig]):
    Config = FrameEchoConfig
    placements = ("chain", "thread", "process")

    def on_source_end(self, camera, ts_wall, frame_index):
        if not self.config.closing:
            return []
        return [Event("closing", camera, ts_wall, frame_index if frame_index >= 0 else None)]

    def start(self):
        if self.config.fail_start_when and os.path.exists(self.config.fail_start_when):
            raise RuntimeError(f"cannot start while {self.config.fail_start_when} exists")

    def process(self, frames):
        while self.config.hang_when and os.path.exists(self.config.hang_when):
            if self.config.held_file:
                open(self.config.held_file, "a").close()
            time.sleep(0.05)
        if self.config.delay_s:
            time.sleep(self.config.delay_s)
        data = {"pad": "x" * self.config.pad} if self.config.pad else {}
        for frame in frames:
            frame.events.append(Event(self.config.kind, frame.camera, frame.ts_wall, frame.index, data=data))
'''


class NotifySocket:
    """A unix datagram socket bound where `$NOTIFY_SOCKET` points, as systemd's is."""

    def __init__(self, path: Path):
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(0.1)
        self.received: list[tuple[float, str]] = []

    def drain(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.socket.recv(65536)
            except TimeoutError:
                return self.received
            for line in data.decode().splitlines():
                self.received.append((time.monotonic(), line))

    def collect(self, seconds: float) -> list[str]:
        """What arrives in the next `seconds` (read as it arrives, so the times are right)."""
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            self.drain()
        return [line for at, line in self.received if at >= began]

    def wait_for(self, line: str, timeout: float, after: float = 0.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, got in self.drain():
                if at >= after and got == line:
                    return at
        raise AssertionError(f"no {line!r} within {timeout} s; got {[got for _, got in self.received][-20:]}")

    def close(self) -> None:
        self.socket.close()


def plugin_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    install_fake_distribution(site, "frame_echo = acme_frame_echo:FrameEcho\n", {"acme_frame_echo": FRAME_ECHO})
    return site


def camera_yaml(name: str, source: Path, **settings: object) -> str:
    lines = [f"  {name}:", f"    source: {source}"] + [f"    {key}: {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def service_config(
    tmp_path: Path,
    cameras: str,
    publisher: str,
    *,
    plugins: str = "  - type: frame_echo\n",
    extra: str = "",
    await_subscribers: int = 0,
) -> Path:
    """`await_subscribers`: the daemon holds capture until that many subscriptions arrived, so that subscribers
    started before it see the first events (PUB/SUB drops what is sent before a subscription arrives)."""
    path = tmp_path / "vigild.yaml"
    path.write_text(
        f"cameras:\n{cameras}plugins:\n{plugins}publisher:\n  endpoint: {publisher}\n  heartbeat_interval: 0.5\n"
        f"  await_subscribers: {await_subscribers}\n  await_timeout: 120\n"
        f"control:\n  endpoint: ipc://{tmp_path}/control\n{extra}"
    )
    return path


class Service:
    """`vigild run` as a process, with the test plugin installed and systemd's environment where asked."""

    def __init__(
        self,
        tmp_path: Path,
        config: Path,
        notify: Path | None = None,
        watchdog_s: float | None = None,
        args: tuple[str, ...] = (),
        environ: dict[str, str] | None = None,
    ):
        env = daemon_env(PYTHONPATH=str(plugin_site(tmp_path)), **(environ or {}))
        if notify is not None:
            env["NOTIFY_SOCKET"] = str(notify)
        if watchdog_s is not None:
            env["WATCHDOG_USEC"] = str(int(watchdog_s * 1e6))
        self.log = tmp_path / "daemon.log"
        self._log_file = self.log.open("w")
        self.process = vigild("run", "--config", str(config), *args, env=env, stderr=self._log_file)
        self.control_endpoint = f"ipc://{tmp_path}/control"

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 15) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took)."""
        began = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        finally:
            self._log_file.close()
        return code, time.monotonic() - began

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()

    def log_text(self) -> str:
        return self.log.read_text()


def frames_of(messages: list[dict], camera: str) -> list[int]:
    return [m["event"]["frame"] for m in messages if m["event"]["type"] == "frame" and m["event"]["camera"] == camera]


def is_heartbeat(event: dict) -> bool:
    return event["type"] == "heartbeat" and event["camera"] == "sys"


def event_seqs(messages: list[dict]) -> list[int]:
    """The `seq` of each event received, heartbeats left out (they have a sequence of their own)."""
    return [m["event"]["seq"] for m in messages if not is_heartbeat(m["event"])]


def gaps(indices: list[int]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in itertools.pairwise(indices) if b != a + 1]


__all__ = [
    "NotifySocket", "Service", "camera_yaml", "event_seqs", "frames_of", "free_endpoint", "gaps", "is_heartbeat",
    "service_config",
]  # fmt: skip
