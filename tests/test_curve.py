"""CURVE on the publisher and the control socket: only clients whose public key is authorised get in."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import zmq.auth
from conftest import ROOT, VTEST, daemon_env, free_endpoint
from service import Service, camera_yaml, service_config

from vigild.client import GAP_TOPIC, Subscriber
from vigild.curve import ClientKeys
from vigild.curve import keygen as curve_keygen
from vigild.service.control import ControlClient

pytestmark = pytest.mark.e2e


def keygen(directory, name: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vigild", "keygen", name, "--dir", str(directory)],
        capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (directory / f"{name}.key").is_file() and (directory / f"{name}.key_secret").stat().st_mode & 0o077 == 0


# Run as `vigild keygen` with umask 022 (the usual default, which a plain open() + chmod afterwards would leave the
# secret world-readable under until the chmod). An audit hook (sys.addaudithook: the interpreter calls it at every
# file operation, before it happens) records the secret's mode at each operation once the file exists, so a mode
# the secret ever had between its creation and the end is seen, without timing.
KEYGEN_WATCHED = """
import json, os, stat, sys
from vigild.cli import main
directory, name = sys.argv[1], sys.argv[2]
secret = os.path.join(directory, name + ".key_secret")
modes, busy = [], False
def hook(event, args):
    global busy
    if busy:
        return
    busy = True
    try:
        modes.append(stat.S_IMODE(os.lstat(secret).st_mode))
    except FileNotFoundError:
        pass
    finally:
        busy = False
os.umask(0o022)
sys.addaudithook(hook)
code = main(["keygen", name, "--dir", directory])
busy = True
print(json.dumps({"code": code, "modes": modes}))
"""


def keygen_watched(directory, name: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", KEYGEN_WATCHED, str(directory), name],
        capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_keygen_secret_is_owner_only_from_creation_under_a_permissive_umask(tmp_path):
    """With umask 022 the secret is 0600 from the first operation after it exists to the end; the pair is a
    matching ZeroMQ certificate pair (the public file holds no secret)."""
    got = keygen_watched(tmp_path, "server")
    assert got["code"] == 0
    assert got["modes"], "the secret was never seen between its creation and the end"
    assert all(mode == 0o600 for mode in got["modes"]), [oct(mode) for mode in got["modes"]]
    assert (tmp_path / "server.key_secret").stat().st_mode & 0o777 == 0o600
    public, secret = zmq.auth.load_certificate(tmp_path / "server.key_secret")
    assert secret is not None and public == zmq.curve_public(secret)
    assert zmq.auth.load_certificate(tmp_path / "server.key") == (public, None)


def test_keygen_never_replaces_an_existing_key_nor_writes_through_a_symlink(tmp_path):
    """A pair in use is not overwritten (a server key replaced would lock every client out), and a symlink planted
    as the secret's name is not followed: the target stays as it was and nothing new is written."""
    keygen(tmp_path, "server")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    again = subprocess.run(
        [sys.executable, "-m", "vigild", "keygen", "server", "--dir", str(tmp_path)],
        capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert again.returncode == 1 and again.stderr.startswith("vigild keygen: ") and "server.key" in again.stderr
    assert "Traceback" not in again.stderr
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before

    target = tmp_path / "elsewhere"
    target.write_text("not a key\n")
    (tmp_path / "planted.key_secret").symlink_to(target)
    with pytest.raises(FileExistsError, match=r"planted\.key_secret"):
        curve_keygen(tmp_path, "planted")
    assert target.read_text() == "not a key\n" and not (tmp_path / "planted.key").exists()


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
        # the journal's replay socket (the publisher's port + 1) asks for the same keys
        with Subscriber(publisher, curve=trusted, resume=True, after_seq=0) as subscriber:
            first = subscriber.receive(timeout=60)
            assert first is not None and first.topic != GAP_TOPIC and first.event["seq"] == 1
        with Subscriber(publisher, curve=stranger, resume=True, after_seq=0, replay_timeout=3) as subscriber:
            assert subscriber.receive(timeout=10) is None and subscriber.replayed == 0
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


def refused_while_trusted_receives(endpoint: str, refused: ClientKeys, trusted: ClientKeys, count: int = 20) -> int:
    """Events that reach a subscriber with `refused` keys while one with `trusted` keys, connected after it,
    receives `count`: no timed wait decides it, only the trusted subscriber's progress."""
    with Subscriber(endpoint, curve=refused) as stranger, Subscriber(endpoint, curve=trusted) as friend:
        got, stray = 0, 0
        while got < count:
            assert friend.receive(timeout=60) is not None, "the trusted subscriber received nothing for 60 s"
            got += 1
            while stranger.receive(timeout=0) is not None:
                stray += 1
        while stranger.receive(timeout=0) is not None:
            stray += 1
    return stray


def status_ok(endpoint: str, keys: ClientKeys, timeout: float) -> bool:
    """Whether a new control connection with `keys` gets an answer within `timeout` seconds."""
    with ControlClient(endpoint, keys, timeout=timeout) as client:
        try:
            return bool(client.request("status")[0]["ok"])
        except TimeoutError:
            return False


def wait_log(service: Service, text: str, times: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while service.log_text().count(text) < times:
        assert time.monotonic() < deadline and service.process.poll() is None, service.log_text()[-2000:]
        time.sleep(0.1)


def test_keys_added_or_removed_take_effect_at_reload(tmp_path):
    """A client key copied into authorized_keys lets that client in (events and control) once the daemon reloads
    (SIGHUP); a key deleted is refused to new connections after the next reload (`ctl reload`), even with a file in
    the directory that is not a key (a copy half done): the keys that can be read are the authorised set."""
    keys, authorised = tmp_path / "keys", tmp_path / "authorized"
    authorised.mkdir()
    for name in ("server", "alice", "bob", "nobody"):
        keygen(keys, name)
    shutil.copy(keys / "alice.key", authorised / "alice.key")
    publisher = free_endpoint()
    curve = f"curve:\n  secret_key: {keys}/server.key_secret\n  authorized_keys: {authorised}\n"
    config = service_config(tmp_path, camera_yaml("a", VTEST, loop=True), publisher, extra=curve)
    alice = ClientKeys.load(keys / "server.key", keys / "alice.key_secret")
    bob = ClientKeys.load(keys / "server.key", keys / "bob.key_secret")
    nobody = ClientKeys.load(keys / "server.key", keys / "nobody.key_secret")
    service = Service(tmp_path, config)
    try:
        with ControlClient(service.control_endpoint, alice, timeout=90) as client:
            assert client.request("status")[0]["ok"]  # waits for the daemon to be up
        assert refused_while_trusted_receives(publisher, bob, alice) == 0
        assert not status_ok(service.control_endpoint, bob, 5)

        # bob's key added; SIGHUP, as `systemctl reload` sends it
        shutil.copy(keys / "bob.key", authorised / "bob.key")
        service.signal(signal.SIGHUP)
        wait_log(service, "CURVE: 2 authorised client key(s)", 2)  # the publisher's and the control socket's
        assert status_ok(service.control_endpoint, bob, 60)
        assert refused_while_trusted_receives(publisher, nobody, bob) == 0  # a key never authorised: still out
        with Subscriber(publisher, curve=bob) as subscriber:
            assert subscriber.receive(timeout=60) is not None

        # alice's key removed, and a file that is not a key left beside bob's; bob asks for the reload
        (authorised / "alice.key").unlink()
        (authorised / "carol.key").write_text("#   ZeroMQ Pub")  # a copy cut short
        with ControlClient(service.control_endpoint, bob, timeout=60) as client:
            reply, _ = client.request("reload")
        assert reply["ok"], reply
        assert "carol.key" in service.log_text()  # the unreadable file is named
        assert refused_while_trusted_receives(publisher, alice, bob) == 0
        assert not status_ok(service.control_endpoint, alice, 5)
        assert status_ok(service.control_endpoint, bob, 60)
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()
