"""`vigild ctl`, `vigild sub` and `vigild keygen` are clients: they must start fast and work on a machine without a
GPU stack, so they import neither torch nor OpenCV nor GStreamer (issue 16). `vigild check` is the positive control:
validating a config with a detector does import them, so the probe below can see an import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, daemon_env, free_endpoint

HEAVY = ("torch", "torchvision", "ultralytics", "cv2", "gi")
PROBE = (
    "import json, sys\n"
    "from vigild.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"print('IMPORTED', json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    "sys.exit(code)\n"
)


def imported(*argv: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules imported, stderr) of `vigild ARGV` run in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=120
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("IMPORTED "))
    return result.returncode, json.loads(line.removeprefix("IMPORTED ")), result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ("ctl", "--config", "configs/vtest.yaml", "--timeout", "0.3", "status"),
        ("ctl", "--endpoint", "ipc:///nonexistent/vigild/control", "--timeout", "0.3", "cameras", "list"),
        ("sub", "--endpoint", "tcp://127.0.0.1:1", "--timeout", "0.3", "--count", "1"),
    ],
    ids=["ctl-config", "ctl-endpoint", "sub"],
)
def test_clients_import_neither_torch_nor_opencv_nor_gstreamer(argv):
    code, heavy, err = imported(*argv)
    assert code == 1, err  # nobody answers here: the client gives up after its timeout, as it should
    assert heavy == [], heavy


def test_keygen_imports_none_of_them_either(tmp_path):
    code, heavy, err = imported("keygen", "alice", "--dir", str(tmp_path))
    assert code == 0 and (tmp_path / "alice.key_secret").is_file(), err
    assert heavy == [], heavy


def test_check_does_import_them_the_probe_sees_an_import():
    code, heavy, err = imported("check", "--config", "configs/vtest.yaml")
    assert code == 0, err
    assert "torch" in heavy, heavy


def test_ctl_config_reads_only_the_control_section(tmp_path):
    """A camera section the daemon would refuse (or a variable it needs that the client's shell lacks) does not stop
    a client finding the endpoint; a bad `control:` section does, with the file, line and key."""
    endpoint = free_endpoint()
    path = tmp_path / "vigild.yaml"
    path.write_text(
        "cameras:\n  door:\n    source: rtsp://cam/x\n    password: ${NOT_SET_IN_THE_CLIENT}\n    fsp: 3\n"
        f"control:\n  endpoint: {endpoint}\n"
    )
    code, heavy, err = imported("ctl", "--config", str(path), "--timeout", "0.3", "status")
    assert code == 1 and f"no reply from {endpoint}" in err, err
    assert heavy == []
    path.write_text("cameras:\n  door:\n    source: rtsp://cam/x\ncontrol:\n  endpoint: 127.0.0.1:5556\n")
    code, _, err = imported("ctl", "--config", str(path), "status")
    assert code == 2 and f"{path}:5: control.endpoint: expected ipc://PATH or tcp://" in err, err


def test_events_imports_none_of_them_either(tmp_path):
    code, heavy, err = imported("events", "--journal", str(tmp_path / "none.db"))
    assert code == 2 and "no event journal at" in err, err
    assert heavy == [], heavy


def test_cluster_commands_are_clients_too(tmp_path):
    """`vigild cluster status` reads NATS (here: nobody listens), `vigild cluster ready` asks the daemon (none runs):
    both fail with the reason, having imported nothing heavy."""
    config = tmp_path / "vigild.yaml"
    config.write_text("cameras:\n  a: {source: 'test://'}\ncluster: {nats: 'nats://127.0.0.1:1'}\n"
                      f"control: {{endpoint: 'ipc://{tmp_path}/control'}}\n")  # fmt: skip
    code, heavy, err = imported("cluster", "status", "--config", str(config))
    assert code == 1 and "cannot read the cluster at nats://127.0.0.1:1" in err, err
    assert heavy == [], heavy
    code, heavy, err = imported("cluster", "ready", "--config", str(config), "--timeout", "0.3")
    assert code == 1 and "not ready" in err, err
    assert heavy == [], heavy
