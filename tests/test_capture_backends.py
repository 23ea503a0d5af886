"""Settings apart from GStreamer (issue 16, point 4): loading a config checks values only and never imports or starts
GStreamer; whether this machine has the back end a camera asks for is decided where capture starts and by `vigild
check`/`run`, which refuse such a config as before (exit 2, file, line and camera)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, daemon_env

WITHOUT_GSTREAMER = "import sys\nsys.modules['gi'] = None  # as on a machine without PyGObject: `import gi` fails\n"
"""Prepended to a probe: this interpreter then has no GStreamer, whatever the machine has."""


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=120
    )


def write(tmp_path: Path) -> Path:
    path = tmp_path / "vigild.yaml"
    path.write_text(
        "cameras:\n  door:\n    source: rtsp://cam/x\n    backend: gstreamer\n"
        "  demo:\n    source: test://\n"
        "  yard:\n    source: rtsp://cam/y\n    backend: opencv\n"
    )
    return path


def test_loading_a_config_that_asks_for_gstreamer_does_not_import_it(tmp_path):
    path = write(tmp_path)
    result = python(
        "import json, sys\n"
        "from vigild.config.loading import load_config\n"
        f"config = load_config({str(path)!r}, environ={{}})\n"
        "print(json.dumps({'cameras': sorted(config.cameras), 'gi': 'gi' in sys.modules}))\n"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"cameras": ["demo", "door", "yard"], "gi": False}


def test_without_gstreamer_a_config_loads_and_only_the_backends_are_refused(tmp_path):
    path = write(tmp_path)
    result = python(
        WITHOUT_GSTREAMER + "from vigild.config.loading import ConfigError, load_config\n"
        f"config = load_config({str(path)!r}, environ={{}})\n"
        "try:\n    config.backends()\nexcept ConfigError as exc:\n    print(exc)\n"
        "print(config.backends(['yard']))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}:2: cameras.door: backend: gstreamer, but GStreamer or PyGObject is not installed "
        "(pip install vigild[gstreamer]); use backend: auto or opencv",
        f"{path}:5: cameras.demo: source: test:// patterns need the GStreamer back end, but GStreamer is not "
        "installed (pip install vigild[gstreamer])",
        "{'yard': 'opencv'}",
    ]


@pytest.mark.parametrize("command", ["check", "run"])
def test_vigild_check_and_run_refuse_a_backend_that_is_not_installed_with_exit_2(tmp_path, command):
    path = write(tmp_path)
    result = python(
        WITHOUT_GSTREAMER + "from vigild.cli import main\n" f"sys.exit(main([{command!r}, '--config', {str(path)!r}]))\n"
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"vigild: config error: {path}:2: cameras.door: backend: gstreamer, but GStreamer or PyGObject is not "
        "installed (pip install vigild[gstreamer]); use backend: auto or opencv",
        f"vigild: config error: {path}:5: cameras.demo: source: test:// patterns need the GStreamer back end, but "
        "GStreamer is not installed (pip install vigild[gstreamer])",
    ]
    assert result.stdout == ""


def test_a_control_clients_camera_needing_gstreamer_is_refused_without_it(tmp_path):
    path = tmp_path / "vigild.yaml"
    path.write_text("cameras:\n  yard:\n    source: rtsp://cam/y\n    backend: opencv\n")
    result = python(
        WITHOUT_GSTREAMER + "from vigild.config.loading import ConfigError, load_config, with_camera\n"
        f"config = load_config({str(path)!r}, environ={{}})\n"
        "try:\n    with_camera(config, 'demo', {'source': 'test://'})\nexcept ConfigError as exc:\n    print(exc)\n"
        "print(sorted(with_camera(config, 'gate', {'source': 'rtsp://cam/z', 'backend': 'opencv'}).cameras))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}:1: cameras.demo: source: test:// patterns need the GStreamer back end, but GStreamer is not "
        "installed (pip install vigild[gstreamer])",  # a new camera has no line of its own: the section's
        "['gate', 'yard']",
    ]


def test_a_capture_whose_backend_is_missing_reports_why_and_reads_nothing():
    """Where capture starts (a reload the daemon could not check beforehand): the camera goes down with the reason
    instead of failing inside the back end."""
    result = python(
        WITHOUT_GSTREAMER + "import time\n"
        "from vigild.capture.camera import CameraCapture\n"
        "from vigild.config.sources import parse_source\n"
        "from vigild.config.settings import CameraConfig, ReconnectConfig\n"
        "from vigild.capture.exchange import FrameExchange\n"
        "exchange = FrameExchange()\n"
        "config = CameraConfig(source='rtsp://cam/x', backend='gstreamer', reconnect=ReconnectConfig(initial_delay=60))\n"
        "capture = CameraCapture('door', config, parse_source(config.source), exchange)\n"
        "capture.start()\n"
        "while capture.stats.state.value != 'backoff':\n    time.sleep(0.01)\n"
        "capture.stop(); capture.join(5)\n"
        "print(capture.stats.last_error); print(capture.stats.frames_decoded)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "backend: gstreamer, but GStreamer or PyGObject is not installed (pip install vigild[gstreamer]); use "
        "backend: auto or opencv",
        "0",
    ]


def test_a_reload_adding_a_camera_whose_backend_is_missing_is_refused(tmp_path):
    """A reload is checked like `vigild run`: a camera this machine cannot capture refuses the whole reload, the
    daemon keeps the cameras it had."""
    from conftest import free_endpoint

    path = tmp_path / "vigild.yaml"
    base = (
        f"publisher:\n  endpoint: {free_endpoint()}\ncontrol:\n  enabled: false\nlog_level: WARNING\n"
        "cameras:\n  yard:\n    source: rtsp://127.0.0.1:9/y\n    backend: opencv\n"
    )
    path.write_text(base)
    result = python(
        WITHOUT_GSTREAMER + "from vigild.config.loading import ConfigError, load_config\n"
        "from vigild.service.daemon import Daemon\n"
        f"path = {str(path)!r}\n"
        "daemon = Daemon(load_config(path, environ={}))\n"
        "daemon.start()\n"
        "try:\n"
        f"    open(path, 'a').write({'  demo:' + chr(10) + '    source: test://' + chr(10)!r})\n"
        "    try:\n        daemon.reload()\n    except ConfigError as exc:\n        print(exc)\n"
        "    print(sorted(daemon.config.cameras))\n"
        "finally:\n    daemon.stop()\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "['yard']", result.stdout
    assert lines[0].startswith(f"{path}:10: cameras.demo: source: test:// patterns need the GStreamer back end"), lines
