"""Shared test fixtures: real media and weights from ../shared, free loopback ports, the daemon as a process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VIGILD_SHARED", ROOT.parent / "shared")).resolve()
MEDIA = SHARED / "media"
MODELS = SHARED / "models"
VTEST = MEDIA / "vtest.avi"
YOLO_FASTEST = MODELS / "yolo-fastest-1.1"

if not VTEST.is_file() or not (YOLO_FASTEST / "yolo-fastest-1.1-xl.weights").is_file():
    raise pytest.UsageError(f"tests need the shared media and models beside the checkout; not found under {SHARED}")


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def daemon_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(VIGILD_MEDIA=str(MEDIA), VIGILD_MODELS=str(MODELS), YOLO_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def vigild(*args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen[str]:
    """Start the installed CLI as a user would (`python -m vigild` is the same entry point as `vigild`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "vigild", *args],
        env=env or daemon_env(),
        cwd=ROOT,
        text=True,
        **popen,  # type: ignore[call-overload]
    )


@pytest.fixture
def endpoint() -> str:
    return free_endpoint()


class PlainSubscriber:
    """tests/plain_subscriber.py in its own process, writing what it receives to a file."""

    def __init__(self, endpoint: str, out: Path, idle_s: float = 5.0):
        self.out = out
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "plain_subscriber.py"), endpoint, str(out), str(idle_s)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def messages(self) -> list[dict]:
        import json

        if not self.out.exists():
            return []
        lines = self.out.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_for(self, predicate, timeout: float) -> list[dict]:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.messages()
            if predicate(messages):
                return messages
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s; got {len(self.messages())} messages")

    def finish(self, timeout: float = 30) -> list[dict]:
        self.process.wait(timeout)
        return self.messages()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def subscriber_factory(tmp_path):
    started: list[PlainSubscriber] = []

    def start(endpoint: str, idle_s: float = 5.0) -> PlainSubscriber:
        subscriber = PlainSubscriber(endpoint, tmp_path / f"events-{len(started)}.jsonl", idle_s)
        started.append(subscriber)
        return subscriber

    yield start
    for subscriber in started:
        subscriber.kill()


@pytest.fixture(scope="session")
def encoded_media(tmp_path_factory) -> dict[str, Path]:
    """vtest.avi's first 400 frames (40 s at 10 fps) as H.264 and H.265 MP4s, for the stream servers."""
    from streams import encode

    folder = tmp_path_factory.mktemp("encoded")
    return {codec: encode(VTEST, folder / f"vtest_{codec}.mp4", codec, 400) for codec in ("h264", "h265")}


@pytest.fixture(scope="session")
def rtsp_server(encoded_media):
    """One RTSP server for the session, serving /h264 and /h265 (tests that kill servers start their own)."""
    from streams import RtspServer

    server = RtspServer({"/h264": encoded_media["h264"], "/h265": encoded_media["h265"]}).start()
    yield server
    server.kill()
