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
