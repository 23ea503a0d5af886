"""Config loading: env expansion, typed validation, and errors that name file, line, key and expectation."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import MODELS, ROOT, VTEST, daemon_env

from vigild.config.loading import load_config
from vigild.config.yamlsource import ConfigError

DARKNET = f"""
  - type: detector
    backend: darknet
    cfg: {MODELS}/yolo-fastest-1.1/yolo-fastest-1.1-xl.cfg
    weights: {MODELS}/yolo-fastest-1.1/yolo-fastest-1.1-xl.weights
    names: {MODELS}/yolo-fastest-1.1/coco.names
    classes: [person]
"""


def write(tmp_path: Path, text: str, name: str = "vigild.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def minimal(source: str = str(VTEST), plugins: str = DARKNET + "  - type: bytetrack\n") -> str:
    return f"cameras:\n  door:\n    source: {source}\nplugins:\n{plugins}"


def test_minimal_config_has_documented_defaults(tmp_path):
    config = load_config(write(tmp_path, minimal()))
    assert list(config.cameras) == ["door"]
    assert config.settings.publisher.endpoint == "tcp://127.0.0.1:5555"
    assert config.settings.device == "auto"
    assert [spec.id for spec in config.chain] == ["detector", "bytetrack"]
    assert set(config.chain[0].per_camera) == {"door"}


def test_capture_workers_auto_is_threads_on_small_hosts_and_the_environment_can_decide_it(tmp_path, monkeypatch):
    from vigild.service.workers import ENV_WORKERS, worker_count

    config = load_config(write(tmp_path, minimal() + "capture:\n  workers: ${N:-auto}\n"), environ={})
    settings = config.settings.capture
    assert settings.workers == "auto" and settings.slots == 8
    monkeypatch.delenv(ENV_WORKERS, raising=False)
    assert worker_count(settings, usable_cpus=2, cameras=4) == 0
    assert worker_count(settings, usable_cpus=16, cameras=16) == 4
    assert worker_count(settings, usable_cpus=64, cameras=3) == 3  # at most one per camera
    monkeypatch.setenv(ENV_WORKERS, "2")
    assert worker_count(settings, usable_cpus=2, cameras=4) == 2
    # a number in the file is what the user asked for: the environment decides only `auto`
    explicit = load_config(write(tmp_path, minimal() + "capture:\n  workers: ${N}\n"), environ={"N": "1"})
    assert worker_count(explicit.settings.capture, usable_cpus=2, cameras=4) == 1
    monkeypatch.setenv(ENV_WORKERS, "many")
    with pytest.raises(ValueError, match="VIGILD_CAPTURE_WORKERS='many'"):
        worker_count(settings, usable_cpus=2, cameras=4)


def test_environment_expansion_with_defaults_and_escape(tmp_path):
    path = write(
        tmp_path,
        minimal(source="${MEDIA}/vtest.avi")
        + "publisher:\n  endpoint: ${PUB:-tcp://127.0.0.1:6000}\nlog_level: ${EMPTY:-WARNING}\n",
    )
    config = load_config(path, environ={"MEDIA": str(VTEST.parent), "EMPTY": ""})
    assert config.cameras["door"].source == str(VTEST)
    assert config.settings.publisher.endpoint == "tcp://127.0.0.1:6000"
    assert config.settings.log_level == "WARNING"
    config = load_config(path, environ={"MEDIA": str(VTEST.parent), "PUB": "ipc:///tmp/x$$y"})
    assert config.settings.publisher.endpoint == "ipc:///tmp/x$$y"  # `$$` is only special in the file itself


def test_unset_variable_names_the_key_and_line(tmp_path):
    path = write(tmp_path, minimal(source="rtsp://admin:${CAM_PASSWORD}@10.0.0.5/stream"))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (
        f"{path}:3: cameras.door.source: environment variable CAM_PASSWORD is not set "
        "(write ${CAM_PASSWORD:-default} for a default)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cameras:\n  door:\n    source: [unclosed\n", ":4: (top level): malformed YAML"),
        (
            "cameras:\n  door:\n    source: a.mp4\n    sauce: b.mp4\n",
            ":4: cameras.door.sauce: unknown key (allowed: source, backend, decoder,",
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\n    fps: fast\n",
            ':4: cameras.door.fps: Input should be a valid number, unable to parse string as a number, got "fast"',
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\n    fps: -3\n",
            ":4: cameras.door.fps: Input should be greater than 0, got -3",
        ),
        ("cameras:\n  door:\n    fps: 5\n", ":2: cameras.door.source: required key is missing"),
        (
            "cameras:\n  door:\n    source: a\n  door:\n    source: b\n",
            ":4: (top level): malformed YAML: duplicate key 'door'",
        ),
        ("cameras:\n  sys:\n    source: a.mp4\n", ":2: cameras.sys: 'sys' is reserved"),
        (
            "cameras:\n  door:\n    source: a.mp4\npublisher:\n  endpoint: 127.0.0.1:5555\n",
            ":5: publisher.endpoint: expected a ZeroMQ endpoint",
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\npublisher:\n  endpoint: tcp://127.0.0.1\n",
            ":5: publisher.endpoint: a tcp:// endpoint needs a port (or *)",
        ),
        ("cameras: {}\n", ":1: cameras: Dictionary should have at least 1 item"),
        ("- just\n- a list\n", ":1: (top level): expected a mapping"),
        (
            "cameras:\n  door:\n    source: a.mp4\nplugins:\n  - type: teleporter\n",
            ":5: plugins.0.type: unknown plugin type 'teleporter' (known: ",
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\nplugins:\n  - type: bytetrack\n    track_buffer: lots\n",
            ":6: plugins.0.track_buffer: Input should be a valid integer",
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\nplugins:\n  - type: detector\n    backend: darknet\n"
            "    cfg: /nonexistent/net.cfg\n    weights: /nonexistent/net.weights\n",
            ":7: plugins.0.cfg: Path does not point to a file",
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\nplugins:\n  - type: detector\n    weights: models/missing.pt\n",
            ":6: plugins.0.weights: weights file not found: models/missing.pt",
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\nplugins:\n  - type: detector\n    backend: darknet\n    weights: x.weights\n",
            ":5: plugins.0.cfg: required when backend is darknet",
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\ncapture:\n  workers: lots\n",
            ':5: capture.workers: expected auto or a number of worker processes from 0 to 64, got "lots"',
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\ncapture:\n  workers: 65\n",
            ":5: capture.workers: expected auto or a number of worker processes from 0 to 64, got 65",
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\ncapture:\n  slots: 2\n",
            ":5: capture.slots: Input should be greater than or equal to 4, got 2",
        ),
    ],
    ids=[
        "malformed",
        "unknown-key",
        "wrong-type",
        "out-of-range",
        "missing-key",
        "duplicate-key",
        "reserved-name",
        "bad-endpoint",
        "endpoint-without-port",
        "no-cameras",
        "not-a-mapping",
        "unknown-plugin",
        "plugin-wrong-type",
        "missing-cfg-file",
        "missing-weights",
        "darknet-needs-cfg",
        "capture-workers-word",
        "capture-workers-too-many",
        "capture-slots-too-few",
    ],
)
def test_bad_config_reports_file_line_key_and_expectation(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    assert expected in message, message


def test_all_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, "cameras:\n  a:\n    source: x\n    fps: 0\n  b:\n    fpz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    paths = [p.dotted() for p in info.value.problems]
    assert paths == ["cameras.a.fps", "cameras.b.source", "cameras.b.fpz"]


def test_per_camera_override_and_disable(tmp_path):
    text = (
        "cameras:\n  door:\n    source: a.mp4\n  yard:\n    source: b.mp4\n    plugins:\n      detector: {confidence: 0.6}\n"
        "  hall:\n    source: c.mp4\n    plugins:\n      bytetrack: {enabled: false}\n"
        f"plugins:\n{DARKNET}    confidence: 0.3\n  - type: bytetrack\n"
    )
    config = load_config(write(tmp_path, text))
    detector, tracker = config.chain
    assert detector.per_camera["door"].confidence == 0.3  # type: ignore[attr-defined]
    assert detector.per_camera["yard"].confidence == 0.6  # type: ignore[attr-defined]
    assert detector.per_camera["door"] is detector.config
    assert set(tracker.per_camera) == {"door", "yard"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "detector: {confidence: 2}",
            ":7: cameras.door.plugins.detector.confidence: Input should be less than or equal to 1",
        ),
        ("detektor: {confidence: 0.5}", ":7: cameras.door.plugins.detektor: no plugin with id 'detektor'"),
        (
            "detector: {enabled: maybe}",
            ':7: cameras.door.plugins.detector.enabled: Input should be a valid boolean, unable to interpret input, got "maybe"',
        ),
    ],
)
def test_bad_override_points_at_the_camera(tmp_path, override, expected):
    path = write(
        tmp_path, f"cameras:\n  door:\n    source: a.mp4\n\n    plugins:\n\n      {override}\nplugins:\n{DARKNET}"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert expected in str(info.value)


def test_duplicate_plugin_ids_are_refused(tmp_path):
    path = write(tmp_path, minimal(plugins="  - type: bytetrack\n  - type: bytetrack\n"))
    with pytest.raises(ConfigError, match=r"plugins.1.id: plugin id 'bytetrack' is already used by plugins.0"):
        load_config(path)


def test_example_config_is_valid():
    config = load_config(ROOT / "configs" / "vtest.yaml", environ=daemon_env())
    assert list(config.cameras) == ["vtest"]
    assert [spec.config.type for spec in config.chain] == ["detector", "bytetrack"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("cameras:\n  door:\n    source: [oops\n", "malformed YAML"),
        ("cameras:\n  door:\n    source: a.mp4\n    colour: red\n", "cameras.door.colour: unknown key"),
        ("cameras:\n  door:\n    source: a.mp4\nplugins:\n  - type: nope\n", "unknown plugin type 'nope'"),
        (
            "cameras:\n  door:\n    source: a.mp4\nscheduler:\n  max_batch: many\n",
            "scheduler.max_batch: Input should be a valid integer",
        ),
        (
            "cameras:\n  door:\n    source: a.mp4\nplugins:\n  - type: detector\n    backend: darknet\n"
            f"    cfg: {MODELS}/yolo-fastest-1.1/yolo-fastest-1.1-xl.cfg\n    weights: {MODELS}/missing.weights\n",
            "plugins.0.weights: weights file not found",
        ),
    ],
    ids=["malformed", "unknown-key", "unknown-plugin", "wrong-type", "missing-weights"],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_cli_refuses_bad_config_with_one_line_and_exit_2(tmp_path, text, fragment, command):
    path = write(tmp_path, text)
    result = subprocess.run(
        [sys.executable, "-m", "vigild", command, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vigild: config error: {path}:")
    assert fragment in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("example", "summary"),
    [
        ("vtest.yaml", ["ok: 1 camera(s) [vtest]", "vtest: file", "journal: ", "/journal.db (replay on ipc://", "/replay)"]),
        ("test-pattern.yaml", ["ok: 2 camera(s) [balls, bars]", "balls: test test://balls"]),
        ("rtsp-cameras.yaml", ["ok: 3 camera(s) [door, yard, garage]", "door: rtsp rtsp://192.0.2.10:554/stream1"]),
        ("gpu-analytics.yaml", ["ok: 16 camera(s) [cam01,", "cam16: rtsp rtsp://192.0.2.36:554/stream1"]),
        ("plaza-analytics.yaml", ["ok: 1 camera(s) [plaza]", "plaza: file"]),
    ],
)
def test_cli_check_accepts_the_examples(example, summary):
    result = subprocess.run(
        [sys.executable, "-m", "vigild", "check", "--config", f"configs/{example}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(DOOR_USER="viewer", DOOR_PASSWORD="not-shown", CAM_USER="viewer", CAM_PASSWORD="not-shown"),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert all(line in result.stdout for line in summary), result.stdout
    assert "not-shown" not in result.stdout


def test_run_refuses_a_class_the_model_does_not_know_with_exit_2(tmp_path):
    path = write(tmp_path, minimal(plugins=DARKNET.replace("classes: [person]", "classes: [person, unicorn]")))
    result = subprocess.run(
        [sys.executable, "-m", "vigild", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=daemon_env(),
    )
    assert result.returncode == 2
    assert f"vigild: config error: {path}:11: plugins.0.classes: the model has no class 'unicorn'" in result.stderr
