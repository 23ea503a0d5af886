"""Config files written to hurt, and sources written to inject: `vigild check` refuses each with exit 2 and one line
`vigild: config error: FILE[:LINE]: ...` (never a traceback, never a hang), a running daemon refuses them on reload
and runs on with its previous config, `${VAR}` values stay plain strings, and no source string can add an element to
a GStreamer pipeline."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import VTEST, daemon_env, free_endpoint
from service import Service, camera_yaml, service_config

from vigild.capture.gst_lockdown import launch
from vigild.capture.gst_pipeline import DECODEBIN_NAME, pipeline_description
from vigild.config.loading import ConfigError, load_config
from vigild.config.sources import SourceKind, parse_source
from vigild.gstreamer import gst_modules, gstreamer_available
from vigild.service.control import ControlClient

VALID = "cameras:\n  door:\n    source: test://\n"


def deep_flow_sequence(path: Path) -> None:
    path.write_text("cameras: " + "[" * 5000 + "]" * 5000 + "\n")


def deep_flow_mapping(path: Path) -> None:
    path.write_text("cameras: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n")


def deep_indentation(path: Path) -> None:
    path.write_text("cameras:\n" + "".join(" " * level + "a:\n" for level in range(1, 2000)))


def deep_block_sequence(path: Path) -> None:
    path.write_text("cameras:\n  " + "- " * 5000 + "x\n")


def alias_bomb(path: Path) -> None:
    """ "Billion laughs": nine levels, each alias nine times the last: 9**9 values once expanded, in 354 bytes."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    path.write_text("\n".join(lines) + "\ncameras: *i\n")


def alias_to_itself(path: Path) -> None:
    path.write_text("cameras: &all\n  door:\n    source: test://\n    again: [*all]\n")


def alias_nesting(path: Path) -> None:
    """Each level well within bounds, but the alias puts one inside the other."""
    path.write_text("cameras: {}\nplugins:\n  - &a " + "[" * 40 + "]" * 40 + "\n  - " + "[" * 30 + "*a" + "]" * 30 + "\n")


def latin1_byte(path: Path) -> None:
    path.write_bytes(b"cameras:\n  door:\n    source: /srv/caf\xe9.mp4\n")


def nul_character(path: Path) -> None:
    path.write_text("cameras:\n  door:\n    source: a\x00b.mp4\n")


def huge_integer(path: Path) -> None:
    path.write_text(VALID + "publisher:\n  heartbeat_interval: " + "9" * 5000 + "\n")


def impossible_date(path: Path) -> None:
    path.write_text("cameras:\n  door:\n    source: 2024-13-45\n")


def oversized(path: Path) -> None:
    path.write_text(VALID + "#" * (5 * 1024 * 1024) + "\n")  # valid YAML: only its size is wrong


HOSTILE: list[tuple[Callable[[Path], None], int | None, str]] = [
    (deep_flow_sequence, 1, "malformed YAML: nested more than 64 levels deep"),
    (deep_flow_mapping, 1, "malformed YAML: nested more than 64 levels deep"),
    (deep_indentation, None, "malformed YAML: nested more than 64 levels deep"),
    (deep_block_sequence, 2, "malformed YAML: nested more than 64 levels deep"),
    (alias_bomb, None, "malformed YAML: aliases expand to more than 100000 values"),
    (alias_to_itself, 4, "malformed YAML: alias *all refers to a collection that contains it"),
    (alias_nesting, 4, "malformed YAML: nested more than 64 levels deep (through alias *a)"),
    (latin1_byte, 3, "not UTF-8: byte 0xe9 at column 21; save the file as UTF-8"),
    (nul_character, 3, "malformed YAML: character #x0000: special characters are not allowed"),
    (huge_integer, 5, "malformed YAML: cannot read this int value: Exceeds the limit (4300 digits)"),
    (impossible_date, 3, "malformed YAML: cannot read this timestamp value: month must be in 1..12"),
    (oversized, None, "(top level): config file larger than 4 MiB"),
]


def check(path: Path | str, command: str = "check", **env: str) -> subprocess.CompletedProcess[str]:
    """`vigild check` (or `run`) as a user runs it; the timeout only keeps a hang from holding the suite (it fails
    the test)."""
    return subprocess.run(
        [sys.executable, "-m", "vigild", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(**env),
    )


def assert_refused(result: subprocess.CompletedProcess[str], path: Path | str, line: int | None, fragment: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    where = re.escape(f"{path}:{line}: ") if line is not None else re.escape(f"{path}:") + r"(\d+: )?"
    assert re.match(f"vigild: config error: {where}", lines[0]), lines[0]
    assert fragment in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(("write", "line", "fragment"), HOSTILE, ids=[write.__name__ for write, _, _ in HOSTILE])
def test_check_refuses_a_hostile_file_with_exit_2_and_its_line(tmp_path, write, line, fragment):
    path = tmp_path / "vigild.yaml"
    write(path)
    assert_refused(check(path), path, line, fragment)


def test_alias_bomb_and_deep_nesting_errors_name_a_line(tmp_path):
    """Where the exact line depends on the limits, it is still a line of the file, at or after the offending part."""
    for write, first in ((alias_bomb, 2), (deep_indentation, 2)):
        path = tmp_path / f"{write.__name__}.yaml"
        write(path)
        found = re.match(rf"vigild: config error: {re.escape(str(path))}:(\d+): ", check(path).stderr)
        assert found is not None and first <= int(found.group(1)) <= len(path.read_text().splitlines())


def test_check_refuses_what_is_not_a_regular_file_without_blocking(tmp_path):
    """A FIFO with no writer would block `open`/`read` forever, /dev/zero never ends, a directory cannot be read."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    folder = tmp_path / "conf.d"
    folder.mkdir()
    for path, kind in ((fifo, "a device, FIFO or socket"), ("/dev/zero", "a device, FIFO or socket"), (folder, "a directory")):
        message = f"(top level): cannot read config file: {kind}, expected a regular file"
        assert_refused(check(path), path, None, message)


def test_run_refuses_a_hostile_file_the_same_way(tmp_path):
    path = tmp_path / "vigild.yaml"
    latin1_byte(path)
    assert_refused(check(path, "run"), path, 3, "not UTF-8: byte 0xe9 at column 21")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert_refused(check(fifo, "run"), fifo, None, "cannot read config file: a device, FIFO or socket")


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_plugin_validator_bug_is_a_config_error_not_a_traceback(tmp_path, command):
    install_buggy_plugin(tmp_path / "site")
    path = tmp_path / "vigild.yaml"
    path.write_text(VALID + "plugins:\n  - type: buggy\n    explode: true\n")
    result = check(path, command, PYTHONPATH=str(tmp_path / "site"))
    assert_refused(result, path, None, f"{path}: RuntimeError: a bug in the plugin's validator")


def test_what_aliases_and_anchors_are_for_still_works(tmp_path):
    """Defaults merged into hundreds of cameras stay well inside the alias budget."""
    path = tmp_path / "vigild.yaml"
    cameras = "".join(f"  cam{i:03}: {{<<: *defaults, source: 'test://?fps={1 + i % 30}'}}\n" for i in range(1, 400))
    path.write_text(f"cameras:\n  cam000: &defaults {{source: test://, realtime: true, stall_timeout: 5}}\n{cameras}")
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert "ok: 400 camera(s)" in result.stdout
    config = load_config(path, environ={})
    assert config.settings.cameras["cam399"].stall_timeout == 5 and config.source("cam399").test.fps == 10


def test_environment_values_stay_plain_strings(tmp_path):
    """`${VAR}` is expanded after parsing, in string values only: a variable holding YAML (a flow collection left
    open, an alias, a Python tag) is that text, never parsed; a `${VAR}` key is no variable."""
    path = tmp_path / "vigild.yaml"
    path.write_text("cameras:\n  door:\n    source: test://\n    username: ${USER_TEXT}\n    password: '${PW}'\n")
    for text in ("a: [1", "*defaults", "!!python/object/apply:os.system ['false']", "{source: /etc/passwd}", "${PW}"):
        config = load_config(path, environ={"USER_TEXT": text, "PW": "x: y"})
        door = config.settings.cameras["door"]
        assert door.username == text and door.password is not None and door.password.get_secret_value() == "x: y"
        assert config.source("door").kind is SourceKind.TEST
    path.write_text("cameras:\n  ${NAME}:\n    source: test://\n")
    with pytest.raises(ConfigError, match=r"cameras\.\$\{NAME\}"):
        load_config(path, environ={"NAME": "door"})


# A third-party plugin with a bug: its config validator raises something other than ValueError, which pydantic lets
# through, so loading a config that sets `explode: true` raises RuntimeError, not a ConfigError.
BUGGY_PLUGIN = """
from typing import Literal

from pydantic import model_validator

from vigild.plugin import Plugin, PluginConfig


class BuggyConfig(PluginConfig):
    type: Literal["buggy"] = "buggy"
    explode: bool = False

    @model_validator(mode="after")
    def _explode(self):
        if self.explode:
            raise RuntimeError("a bug in the plugin's validator")
        return self


class Buggy(Plugin[BuggyConfig]):
    Config = BuggyConfig

    def process(self, frames):
        pass
"""


def install_buggy_plugin(site: Path) -> None:
    info = site / "buggy_vigild_plugin-1.0.dist-info"  # beside the frame_echo plugin that `Service` installs there
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: buggy-vigild-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vigild.plugins]\nbuggy = buggy_vigild_plugin:Buggy\n")
    (site / "buggy_vigild_plugin.py").write_text(BUGGY_PLUGIN)


def control(service: Service, command: str) -> dict:
    with ControlClient(service.control_endpoint, timeout=60) as client:
        reply, _ = client.request(command)
    return reply


def cameras_of(service: Service) -> list[str]:
    reply = control(service, "status")
    assert reply["ok"], reply
    return sorted(reply["result"]["cameras"])


REFUSED = "still running the previous config"


def wait_refusals(service: Service, count: int, timeout: float = 60) -> list[str]:
    """The log's lines saying a reload was refused, once there are `count`; fails at once if the daemon ended."""
    deadline = time.monotonic() + timeout
    while True:
        assert service.process.poll() is None, f"the daemon ended:\n{service.log_text()[-3000:]}"
        lines = [line for line in service.log_text().splitlines() if REFUSED in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


@pytest.mark.e2e
def test_a_reload_of_a_hostile_file_never_ends_the_daemon(tmp_path):
    """SIGHUP (`systemctl reload`) with a broken or hostile file: each is refused with one error line naming the
    file, the daemon runs on with its previous config and answers on the control socket; so does a plugin whose
    validator has a bug. Once the file is fixed, the next SIGHUP applies it."""
    install_buggy_plugin(tmp_path / "site")
    a = camera_yaml("a", VTEST, loop=True)
    config = service_config(tmp_path, a, free_endpoint())
    valid = config.read_text()
    service = Service(tmp_path, config)
    try:
        deadline = time.monotonic() + 120
        while True:  # up once the control socket answers
            assert service.process.poll() is None and time.monotonic() < deadline, service.log_text()[-3000:]
            try:
                assert cameras_of(service) == ["a"]
                break
            except TimeoutError:
                continue

        def buggy_plugin(path: Path) -> None:
            path.write_text(valid.replace("plugins:\n", "plugins:\n  - type: buggy\n    explode: true\n"))

        attempts = [
            (latin1_byte, f"{config}:3: (top level): not UTF-8: byte 0xe9"),
            (deep_flow_sequence, f"{config}:1: (top level): malformed YAML: nested more than 64 levels deep"),
            (deep_indentation, "malformed YAML: nested more than 64 levels deep"),
            (alias_bomb, "malformed YAML: aliases expand to more than 100000 values"),
            (nul_character, f"{config}:3: (top level): malformed YAML: character #x0000"),
            (buggy_plugin, f"{config}: RuntimeError: a bug in the plugin's validator"),
        ]
        for count, (write, fragment) in enumerate(attempts, start=1):
            write(config)
            service.signal(signal.SIGHUP)
            lines = wait_refusals(service, count)
            assert len(lines) == count, lines  # one line per refused reload
            assert fragment in lines[-1] and str(config) in lines[-1], lines[-1]
            assert cameras_of(service) == ["a"]
        assert "Traceback" not in service.log_text()

        # the same through the control socket: refused as an invalid config, not an internal error
        latin1_byte(config)
        reply = control(service, "reload")
        assert not reply["ok"] and reply["error"]["code"] == "invalid_config", reply
        assert f"{config}:3: (top level): not UTF-8" in reply["error"]["message"], reply

        config.write_text(valid.replace(a, a + camera_yaml("b", VTEST, loop=True)))
        service.signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while cameras_of(service) != ["a", "b"]:
            assert service.process.poll() is None and time.monotonic() < deadline, service.log_text()[-3000:]
            time.sleep(0.1)
    finally:
        code, _ = service.stop()
    assert code == 0, service.log_text()[-3000:]


HOSTILE_SOURCES = [
    '/srv/a" ! fakesrc name=evil ! fakesink name=evil2 "b.mp4',
    '/srv/a\\" ! fakesrc name=evil ! fakesink "\\b.mp4',
    "/srv/a\n! fakesrc name=evil\n.mp4",
    "/srv/a' ! fakesrc name=evil ! fakesink '.mp4",
    "/srv/a.mp4 ! fakesrc name=evil",
    'file:///srv/a%22%20!%20fakesrc%20name=evil%20!%20fakesink%20%22.mp4',
    'rtsp://cam/a"!fakesrc!fakesink"x',
    "rtsp://cam/a%22%20!%20fakesrc%20name=evil%20!%20fakesink%20%22",
    'http://cam/x?a="!fakesrc!fakesink!"',
    '/dev/v4l/by-id/usb-"!fakesrc!fakesink!"',
]


@pytest.mark.skipif(not gstreamer_available(), reason="needs GStreamer")
@pytest.mark.parametrize("source", HOSTILE_SOURCES, ids=range(len(HOSTILE_SOURCES)))
def test_a_source_is_one_property_value_in_the_gstreamer_pipeline(source):
    """Parsed by GStreamer itself: the source element holds the source exactly, and nothing else was added."""
    gst = gst_modules()[0]
    spec = parse_source(source)
    description = pipeline_description(spec, resize=(320, 240), fps=5, sync=False, drop=True)
    pipeline = launch(description)  # as the reader builds it: a file's filesrc from the kept factory
    elements, iterator = [], pipeline.iterate_elements()
    while (step := iterator.next())[0] == gst.IteratorResult.OK:
        elements.append(step[1].get_factory().get_name())
    expected = ["appsink", "capsfilter", "videoconvert", "videorate", "videoscale"]
    if spec.kind is SourceKind.FILE:
        expected += ["decodebin", "filesrc"]
        assert pipeline.get_by_name(DECODEBIN_NAME).get_static_pad("sink").get_peer().get_parent().get_property(
            "location"
        ) == spec.uri
    elif spec.kind is SourceKind.V4L2:
        expected += ["decodebin", "v4l2src"]
        assert pipeline.get_by_name(DECODEBIN_NAME).get_static_pad("sink").get_peer().get_parent().get_property(
            "device"
        ) == spec.uri
    else:
        expected += ["uridecodebin"]
        assert pipeline.get_by_name(DECODEBIN_NAME).get_property("uri") == spec.uri == source
    assert sorted(elements) == sorted(expected), elements  # nothing added: no fakesrc, no fakesink
