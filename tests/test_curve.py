"""CURVE on the publisher and the control socket: only clients whose public key is authorised get in."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, VTEST, daemon_env, free_endpoint
from service import Service, camera_yaml, service_config

from vigild.client import Subscriber
from vigild.control import ControlClient
from vigild.curve import ClientKeys

pytestmark = pytest.mark.e2e


def keygen(directory, name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vigild", "keygen", name, "--dir", str(directory)],
        capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (directory / f"{name}.key").is_file() and (directory / f"{name}.key_secret").stat().st_mode & 0o077 == 0


def received(endpoint: str, curve: ClientKeys | None, seconds: float) -> int:
    count = 0
    with Subscriber(endpoint, curve=curve) as subscriber:
        while subscriber.receive(timeout=seconds) is not None:
            count += 1
            if count >= 3:
                break
    return count


def test_only_authorised_keys_receive_events_and_send_commands(tmp_path):
    keys, authorised = tmp_path / "keys", tmp_path / "authorized"
    authorised.mkdir()
    for name in ("server", "trusted", "stranger"):
        keygen(keys, name)
    shutil.copy(keys / "trusted.key", authorised / "trusted.key")
    publisher = free_endpoint()
    curve = f"curve:\n  secret_key: {keys}/server.key_secret\n  authorized_keys: {authorised}\n"
    config = service_config(tmp_path, camera_yaml("a", VTEST, loop=True), publisher, extra=curve)
    trusted = ClientKeys.load(keys / "server.key", keys / "trusted.key_secret")
    stranger = ClientKeys.load(keys / "server.key", keys / "stranger.key_secret")
    service = Service(tmp_path, config)
    try:
        with ControlClient(service.control_endpoint, trusted, timeout=90) as client:
            assert client.request("status")[0]["ok"]  # waits for the daemon to be up
        assert received(publisher, trusted, 10) == 3
        assert received(publisher, None, 3) == 0
        assert received(publisher, stranger, 3) == 0
        for keys_used in (None, stranger):
            with ControlClient(service.control_endpoint, keys_used, timeout=3) as client, pytest.raises(TimeoutError):
                client.request("status")
        cli = subprocess.run(
            [sys.executable, "-m", "vigild", "sub", "--endpoint", publisher, "--count", "2", "--timeout", "20",
             "--server-key", str(keys / "server.key"), "--key", str(keys / "trusted.key_secret")],
            capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0 and len(cli.stdout.splitlines()) == 2, cli.stderr
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()


def test_a_public_bind_without_curve_is_warned_about_loudly(tmp_path):
    port = free_endpoint().rsplit(":", 1)[1]
    config = service_config(tmp_path, camera_yaml("a", VTEST, loop=True), f"tcp://0.0.0.0:{port}")
    service = Service(tmp_path, config)
    try:
        with ControlClient(service.control_endpoint, timeout=90) as client:
            assert client.request("status")[0]["ok"]
        assert "INSECURE: publisher binds tcp://0.0.0.0" in service.log_text()
        service.stop()
    finally:
        service.kill()
