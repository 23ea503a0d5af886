"""The control socket is not a way in (issue 15): bounded messages, errors answered as such (never `internal`),
a reload or camera change that cannot hold up `status`, insecure binds that warn, an owner-only socket
directory, per-camera state that does not outlive its camera, and the log level given on the command line.
The daemon tests talk to a real `vigild run` only from outside (control socket, its log, /proc)."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import stat
import time
from pathlib import Path

import pytest
import service as service_module
import zmq
from conftest import VTEST, daemon_env, free_endpoint, install_fake_distribution, vigild
from service import FRAME_ECHO, Service, camera_yaml, service_config

from vigild.service.control import MAX_FRAME_BYTES, MAX_REQUEST_BYTES, ControlClient, ControlServer, default_endpoint

pytestmark = pytest.mark.e2e

TEST_SOURCE = "test://balls?width=160&height=120&fps=5"
"""A source a control client may name (not a local file)."""

# A test plugin whose start() blocks while the file `hang_when` exists (touching `held_file`), like a model that
# takes long to load; `tag` is a harmless setting a camera can override to get an instance of its own.
SLOW_START = '''
import os
import time
from typing import Literal

from vigild.plugin import Plugin, PluginConfig


class SlowStartConfig(PluginConfig):
    type: Literal["slow_start"] = "slow_start"
    hang_when: str
    held_file: str
    tag: str = ""


class SlowStart(Plugin[SlowStartConfig]):
    Config = SlowStartConfig

    def start(self):
        while os.path.exists(self.config.hang_when):
            open(self.config.held_file, "a").close()
            time.sleep(0.05)

    def process(self, frames):
        pass
'''


@pytest.fixture
def slow_start_site(monkeypatch):
    """Services of this test get slow_start beside frame_echo."""

    def site(tmp_path: Path) -> Path:
        folder = tmp_path / "site"
        entry_points = "frame_echo = acme_frame_echo:FrameEcho\nslow_start = acme_slow_start:SlowStart\n"
        install_fake_distribution(folder, entry_points, {"acme_frame_echo": FRAME_ECHO, "acme_slow_start": SLOW_START})
        return folder

    monkeypatch.setattr(service_module, "plugin_site", site)


def control(endpoint: str, command: str, timeout: float = 60, **arguments: object) -> dict:
    with ControlClient(endpoint, timeout=timeout) as client:
        reply, _ = client.request(command, **arguments)
    return reply


def wait_until(condition, service: Service, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert service.process.poll() is None, f"the daemon exited: {service.log_text()[-3000:]}"
        if condition():
            return
        assert time.monotonic() < deadline, f"no {what} within {timeout} s: {service.log_text()[-3000:]}"
        time.sleep(0.05)


def streaming(service: Service, camera: str) -> None:
    def frames() -> bool:
        try:
            reply = control(service.control_endpoint, "status", timeout=5)
        except TimeoutError:
            return False  # still starting (or exited: wait_until says so)
        return reply["result"]["cameras"].get(camera, {}).get("frames", 0) > 0

    wait_until(frames, service, f"frames of {camera}")


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def ask(socket: zmq.Socket, frames: list[bytes], timeout_s: float = 60) -> dict:
    socket.send_multipart(frames)
    assert socket.poll(int(timeout_s * 1000)), f"no reply to {len(frames)} frame(s) of {len(frames[-1])} bytes"
    reply = socket.recv_multipart()
    return json.loads(reply[1] if reply[0] == b"" else reply[0])


def test_huge_or_malformed_messages_neither_grow_memory_nor_stop_the_answers(tmp_path):
    """The issue's attack: messages of 150 frames of 1 MiB each (they took the daemon from 75 to 383 MB). Now a
    frame over MAX_FRAME_BYTES disconnects its peer before it is stored, a many-frame message is read frame by frame
    and answered `bad_request`, an oversized request `too_large`, 60,000 nested `[` or a camera's settings nested 600
    deep `bad_request`: the daemon's peak
    memory stays put, it answers `status` to that client and to others, and logs no traceback."""
    config = service_config(tmp_path, camera_yaml("a", VTEST, loop=True), free_endpoint())
    service = Service(tmp_path, config)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        streaming(service, "a")
        dealer.connect(service.control_endpoint)
        assert ask(dealer, [b"", b'{"cmd": "status"}'])["ok"]
        before = peak_rss_kib(service.process.pid)

        megabyte = b"x" * (1 << 20)
        for _ in range(3):
            dealer.send_multipart([b"", *[megabyte] * 150])
        # the peer is cut off at the first big frame of each (no reply); it reconnects, and is answered again
        dealer.send_multipart([b"", b'{"cmd": "status"}'])
        replies = []
        while not (replies and replies[-1]["ok"]):
            assert dealer.poll(120_000), f"no reply to status; got {replies}"
            replies.append(json.loads(dealer.recv_multipart()[-1]))
        grown_mib = (peak_rss_kib(service.process.pid) - before) / 1024
        assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"
        assert len(replies) == 1, replies

        under_limit = b"x" * (MAX_FRAME_BYTES - 1024)
        reply = ask(dealer, [b"", *[under_limit] * 150])
        assert reply["error"]["code"] == "bad_request" and "150 frames" in reply["error"]["message"], reply
        oversized = b'{"cmd": "status", "pad": "' + b"x" * MAX_REQUEST_BYTES + b'"}'
        assert ask(dealer, [b"", oversized])["error"]["code"] == "too_large"
        assert ask(dealer, [b"", b"[" * 60_000])["error"]["code"] == "bad_request"
        # parsable, but deep enough to overflow the copy and validation of a camera's settings
        deep = {"cmd": "cameras", "action": "add", "camera": "z", "config": {"source": TEST_SOURCE, "x": [[]]}}
        nested = json.dumps(deep).replace("[[]]", "[" * 600 + "]" * 600).encode()
        reply = ask(dealer, [b"", nested])
        assert reply["error"]["code"] == "bad_request" and "nested" in reply["error"]["message"], reply
        assert ask(dealer, [b"", b'{"cmd": "status"}'])["ok"]
        assert control(service.control_endpoint, "status")["ok"]  # another client
        grown_mib = (peak_rss_kib(service.process.pid) - before) / 1024
        assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB"
        code, _ = service.stop()
        assert code == 0
    finally:
        dealer.close()
        context.term()
        service.kill()
    log = service.log_text()
    assert "Traceback" not in log and "control command failed" not in log and "INSECURE" not in log, log[-3000:]


def test_a_slow_reload_or_camera_change_never_holds_up_status(tmp_path, slow_start_site):
    """A SIGHUP reload whose new plugin instance takes long to start holds the configuration: a `pause` meanwhile
    is answered `busy` after `control.timeout`, with nothing changed, and `status` is answered throughout. A
    `cameras add` whose plugin instance takes long to start runs on its own thread: another client's `status` is
    answered while it loads, a second change is answered `busy` at once, and the add is answered once loaded."""
    hang, held = tmp_path / "hang", tmp_path / "held"
    slow = f"  - type: slow_start\n    hang_when: {hang}\n    held_file: {held}\n"
    config = service_config(
        tmp_path, camera_yaml("a", VTEST, loop=True), free_endpoint(), plugins=slow, extra="  timeout: 2\n"
    )
    original = config.read_text()
    service = Service(tmp_path, config)
    endpoint = service.control_endpoint
    try:
        streaming(service, "a")

        # a reload on the main thread, held in its new plugin's start()
        hang.touch()
        config.write_text(original.replace(slow, slow + "    tag: reloaded\n"))
        service.signal(signal.SIGHUP)
        wait_until(held.exists, service, "the reload's plugin start")
        reply = control(endpoint, "pause", camera="a", timeout=30)
        assert not reply["ok"] and reply["error"]["code"] == "busy", reply
        status = control(endpoint, "status", timeout=30)["result"]
        assert status["cameras"]["a"]["state"] == "streaming", status  # the pause changed nothing
        hang.unlink()
        wait_until(lambda: "configuration applied" in service.log_text(), service, "the reload applied")

        # a camera added through the socket, its own plugin instance held in start()
        held.unlink()
        hang.touch()
        adding = ControlClient(endpoint, timeout=60)
        try:
            adding.socket.send_multipart(
                [b"", json.dumps({"cmd": "cameras", "action": "add", "camera": "b", "config": {
                    "source": TEST_SOURCE, "plugins": {"slow_start": {"tag": "b"}}}}).encode()]
            )  # fmt: skip
            wait_until(held.exists, service, "the added camera's plugin start")
            status = control(endpoint, "status", timeout=30)["result"]
            assert sorted(status["cameras"]) == ["a"], status
            reply = control(endpoint, "resume", camera="a", timeout=30)
            assert not reply["ok"] and reply["error"]["code"] == "busy", reply
            assert not adding.socket.poll(0)  # still loading
            hang.unlink()
            assert adding.socket.poll(60_000), "no reply to the add"
            frames = adding.socket.recv_multipart()
            reply = json.loads(frames[1] if frames[0] == b"" else frames[0])
        finally:
            adding.close()
        assert reply["ok"] and reply["result"]["cameras"]["added"] == ["b"], reply
        assert sorted(control(endpoint, "status")["result"]["cameras"]) == ["a", "b"]
        code, _ = service.stop()
        assert code == 0
    finally:
        hang.unlink(missing_ok=True)
        service.kill()


def test_a_change_sent_while_the_daemon_starts_is_busy_and_the_daemon_starts(tmp_path):
    """The control socket answers while models load and while capture awaits its subscribers. A change sent then
    is answered `busy` with nothing changed (before, a camera added then was started twice and the daemon exited);
    once capture runs, the same change is made."""
    publisher = free_endpoint()
    config = service_config(tmp_path, camera_yaml("a", VTEST, loop=True), publisher, await_subscribers=1)
    service = Service(tmp_path, config)
    endpoint = service.control_endpoint
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    try:
        wait_until(lambda: "subscriber(s) before capture starts" in service.log_text(), service, "the wait")

        def answered() -> bool:
            try:
                return control(endpoint, "status", timeout=5)["ok"]
            except TimeoutError:
                return False

        wait_until(answered, service, "a status reply")
        for command, arguments in (
            ("cameras", {"action": "add", "camera": "c", "config": {"source": TEST_SOURCE}}),
            ("pause", {"camera": "a"}),
            ("reload", {}),
        ):
            reply = control(endpoint, command, **arguments)
            assert not reply["ok"] and reply["error"]["code"] == "busy", (command, reply)
            assert "starting" in reply["error"]["message"], reply
        subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        subscriber.connect(publisher)
        streaming(service, "a")
        reply = control(endpoint, "cameras", action="add", camera="c", config={"source": TEST_SOURCE})
        assert reply["ok"] and reply["result"]["cameras"]["added"] == ["c"], reply
        streaming(service, "c")
        code, _ = service.stop()
        assert code == 0
    finally:
        subscriber.close(linger=0)
        service.kill()


def test_a_plugin_that_fails_to_start_for_a_new_camera_is_a_config_error(tmp_path):
    """`cameras add` and `update` whose camera gets a plugin instance of its own that fails to start are answered
    `invalid_config` naming the plugin's `plugins.N` key (never `internal`), logged once each without a traceback;
    a local file as a control client's source is `forbidden`; the running cameras carry on."""
    broken = tmp_path / "broken"
    echo = f"  - type: frame_echo\n    fail_start_when: {broken}\n"
    config = service_config(tmp_path, camera_yaml("a", VTEST, loop=True), free_endpoint(), plugins=echo)
    service = Service(tmp_path, config)
    endpoint = service.control_endpoint
    try:
        streaming(service, "a")
        broken.touch()
        own_instance = {"source": TEST_SOURCE, "plugins": {"frame_echo": {"delay_s": 0.001}}}
        for action, camera in (("add", "b"), ("update", "a")):
            reply = control(endpoint, "cameras", action=action, camera=camera, config=own_instance)
            assert not reply["ok"] and reply["error"]["code"] == "invalid_config", reply
            message = reply["error"]["message"]
            assert "plugins.0" in message and "failed to start" in message and str(broken) in message, reply
        reply = control(endpoint, "cameras", action="add", camera="c", config={"source": str(VTEST)})
        assert not reply["ok"] and reply["error"]["code"] == "forbidden", reply
        status = control(endpoint, "status")["result"]
        assert sorted(status["cameras"]) == ["a"] and status["cameras"]["a"]["state"] == "streaming", status
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()
    log = service.log_text()
    assert "Traceback" not in log and "internal" not in log, log[-3000:]
    refused = [line for line in log.splitlines() if "change refused" in line]
    assert len(refused) == 3 and all("ERROR" in line for line in refused), refused


def test_a_camera_removed_and_added_again_starts_from_zero(tmp_path):
    """A removed camera leaves no counts behind: added again under the same name (reload), its frames and drops
    in `status` start from zero instead of carrying the old camera's on."""
    publisher = free_endpoint()
    a, c = camera_yaml("a", VTEST, loop=True), camera_yaml("c", VTEST, loop=True)
    config = service_config(tmp_path, a + c, publisher)
    original = config.read_text()
    service = Service(tmp_path, config)
    endpoint = service.control_endpoint
    try:
        streaming(service, "c")
        config.write_text(original.replace(c, ""))
        assert control(endpoint, "reload")["result"]["cameras"]["removed"] == ["c"]
        config.write_text(original.replace(c, camera_yaml("c", "rtsp://127.0.0.1:9/nothing-here")))
        assert control(endpoint, "reload")["result"]["cameras"]["added"] == ["c"]
        camera = control(endpoint, "status")["result"]["cameras"]["c"]
        assert camera["frames"] == 0 and camera["drops"] == 0 and camera["captured"] == 0, camera
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()


def test_tcp_control_without_curve_and_metrics_beyond_loopback_warn(tmp_path):
    """Every local user can reach a tcp:// control socket, even on loopback: without CURVE that is an INSECURE
    warning; so is a metrics server bound beyond loopback."""
    control_endpoint = free_endpoint()
    config = tmp_path / "vigild.yaml"
    config.write_text(
        f"cameras:\n{camera_yaml('a', VTEST, loop=True)}plugins:\n  - type: frame_echo\n"
        f"publisher:\n  endpoint: {free_endpoint()}\ncontrol:\n  endpoint: {control_endpoint}\n"
        "metrics:\n  enabled: true\n  address: 0.0.0.0\n  port: 0\n"
    )
    service = Service(tmp_path, config)
    service.control_endpoint = control_endpoint
    try:
        streaming(service, "a")
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()
    warnings = [line for line in service.log_text().splitlines() if "INSECURE" in line]
    assert len(warnings) == 2, warnings
    assert f"control socket binds {control_endpoint} without CURVE" in warnings[0], warnings
    assert "metrics served on 0.0.0.0" in warnings[1], warnings


def test_the_control_socket_directory_is_owner_only_and_never_chmodded(tmp_path):
    """A directory the daemon makes is 0700; one that is owner-only already is used; one open to others (0755) is
    refused with what to do, and left as it was. The default without XDG_RUNTIME_DIR (and outside systemd) is under
    the user's home, never a fixed name under /tmp another user could create first; too long a path is a clear
    error."""
    made = tmp_path / "made" / "deeper"
    server = ControlServer(_control(f"ipc://{made}/control"), None, None)  # type: ignore[arg-type]
    server.start()
    server.stop()
    assert stat.S_IMODE(made.stat().st_mode) == 0o700 and stat.S_IMODE((made / "control").stat().st_mode) == 0o600

    owner_only = tmp_path / "owner-only"
    owner_only.mkdir(mode=0o700)
    server = ControlServer(_control(f"ipc://{owner_only}/control"), None, None)  # type: ignore[arg-type]
    server.start()
    server.stop()

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    with pytest.raises(OSError, match=r"open to other users \(mode 0755\).*chmod 700"):
        ControlServer(_control(f"ipc://{shared}/control"), None, None).start()  # type: ignore[arg-type]
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755 and not (shared / "control").exists()

    deep = tmp_path / ("d" * 100)
    with pytest.raises(OSError, match="over the 107"):
        ControlServer(_control(f"ipc://{deep}/control"), None, None).start()  # type: ignore[arg-type]

    # without XDG_RUNTIME_DIR: per config file, in the run/ directory of its state directory (vigild.paths)
    key = "cams-" + hashlib.sha1(b"/etc/cams.yaml", usedforsecurity=False).hexdigest()[:8]
    ann = {"HOME": "/home/ann"}
    assert default_endpoint(ann, "/etc/cams.yaml") == f"ipc:///home/ann/.local/state/vigild/{key}/run/control"
    assert default_endpoint(ann) == "ipc:///home/ann/.local/state/vigild/default/run/control"
    assert default_endpoint({"HOME": "/home/ann", "XDG_RUNTIME_DIR": "/run/user/7"}) == "ipc:///run/user/7/vigild/control"
    systemd = {"HOME": "/home/ann", "XDG_RUNTIME_DIR": "/run/user/7", "RUNTIME_DIRECTORY": "/run/vigild"}
    assert default_endpoint(systemd) == "ipc:///run/vigild/control"


def test_a_daemon_refuses_a_control_directory_open_to_others(tmp_path):
    """`vigild run` with control.endpoint in a 0755 directory stops with a config error naming the key and why."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    config = service_config(tmp_path, camera_yaml("a", VTEST), free_endpoint(), plugins="  []\n")
    config.write_text(config.read_text().replace(f"ipc://{tmp_path}/control", f"ipc://{shared}/control"))
    process = vigild("run", "--config", str(config), env=daemon_env(), stderr=-1)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert "control.endpoint" in err and "open to other users" in err, err
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


def test_a_log_level_given_on_the_command_line_survives_camera_changes(tmp_path):
    """With `log_level_override` (vigild run --log-level), applying a config never changes the level; without it,
    the config's `log_level` applies."""
    from vigild.config.loading import load_config
    from vigild.service.daemon import Daemon

    path = tmp_path / "vigild.yaml"
    path.write_text(
        f"cameras:\n  a:\n    source: '{TEST_SOURCE}'\npublisher:\n  endpoint: {free_endpoint()}\n"
        f"control:\n  endpoint: ipc://{tmp_path}/control\nlog_level: WARNING\n"
    )
    root = logging.getLogger()
    previous = root.level
    try:
        for override, expected in (("DEBUG", logging.DEBUG), (None, logging.WARNING)):
            root.setLevel(logging.DEBUG)
            daemon = Daemon(load_config(path), log_level_override=override)
            daemon.start()
            try:
                daemon.set_camera("b", {"source": TEST_SOURCE})
                assert root.level == expected, (override, logging.getLevelName(root.level))
            finally:
                daemon.stop()
    finally:
        root.setLevel(previous)


def test_vigild_run_log_level_outlasts_a_camera_added_through_the_socket(tmp_path):
    """`vigild run --log-level WARNING` on a config at the default INFO: a camera added and removed through the
    control socket leaves the level at WARNING, so no INFO line is ever logged (before, the change set INFO and
    logged `configuration applied`)."""
    config = service_config(tmp_path, camera_yaml("a", VTEST, loop=True), free_endpoint())
    service = Service(tmp_path, config, args=("--log-level", "WARNING"))
    endpoint = service.control_endpoint
    try:
        streaming(service, "a")
        reply = control(endpoint, "cameras", action="add", camera="b", config={"source": TEST_SOURCE})
        assert reply["ok"], reply
        streaming(service, "b")
        assert control(endpoint, "cameras", action="remove", camera="b")["ok"]
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()
    lines = service.log_text().splitlines()
    assert not [line for line in lines if " INFO " in line], lines[:20]


def _control(endpoint: str):
    from vigild.config.loading import ControlConfig

    return ControlConfig(endpoint=endpoint)

