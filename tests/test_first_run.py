"""The daemon started exactly as the README says (`vigild run --config configs/vtest.yaml`, from the repository), on
a machine as a new user has it: a fresh HOME, no XDG_*, no STATE_DIRECTORY or RUNTIME_DIRECTORY (a container, a root
shell, a CI runner). It must publish track events, twice in a row (the second run finds the first's state), from a
~/.local/state/vigild that earlier versions left at 0755, and as an unprivileged user (issue 29, point 1).

Only the publisher's port is moved off the fixed 5555 (VIGILD_PUB, which configs/vtest.yaml reads) so that the test
never meets another daemon; the control socket and the journal come from the defaults (docs/service.md)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import MEDIA, MODELS, ROOT, PlainSubscriber, free_endpoint

from vigild import paths

CONFIG = "configs/vtest.yaml"
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def readme_env(home: Path, endpoint: str) -> dict[str, str]:
    """A new user's shell: HOME, PATH and the rest as they are, nothing of XDG or systemd."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("XDG_") and name not in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY")
    }
    env.update(HOME=str(home), VIGILD_MEDIA=str(MEDIA), VIGILD_MODELS=str(MODELS), YOLO_OFFLINE="1",
               PYTHONUNBUFFERED="1", VIGILD_PUB=endpoint)  # fmt: skip
    return env


def vigild_cli(command: str, *args: str, config: str = CONFIG, prefix: tuple[str, ...] = ()) -> list[str]:
    """`vigild COMMAND --config CONFIG ARGS...` as the README writes it (`vigild` is `python -m vigild`)."""
    return [*prefix, sys.executable, "-m", "vigild", command, "--config", config, *args]


def run_until_tracks(env: dict[str, str], out: Path, config: str = CONFIG, prefix: tuple[str, ...] = (),
                     during: object = None) -> tuple[list[dict], str]:  # fmt: skip
    """Start the daemon as the README does, with a subscriber in a process of its own on its publisher; stop it with
    SIGINT once track events came. Returns the events and the daemon's log."""
    subscriber = PlainSubscriber(env["VIGILD_PUB"], out.with_suffix(".jsonl"), idle_s=60)
    log = out.with_suffix(".log")
    with open(log, "w") as stderr:
        daemon = subprocess.Popen(vigild_cli("run", config=config, prefix=prefix), cwd=ROOT, env=env,
                                  stderr=stderr, text=True)  # fmt: skip
    try:
        try:
            subscriber.wait_for(lambda got: any(m["event"]["type"].startswith("track.") for m in got) or
                                daemon.poll() is not None, timeout=300)  # fmt: skip
            if callable(during) and daemon.poll() is None:
                during()
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGINT)
            code = daemon.wait(120)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        subscriber.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    events = [m["event"] for m in subscriber.messages()]
    assert any(e["type"].startswith("track.") for e in events), text[-3000:]
    return events, text


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home():
    """A fresh HOME with a path as short as a real one (/home/ann): the control socket's fallback in it must fit a
    unix socket's 107 bytes, which pytest's deep tmp_path would not leave room for."""
    made = Path(tempfile.mkdtemp(prefix="vt-h-"))
    yield made
    shutil.rmtree(made, ignore_errors=True)


def test_the_readme_command_runs_twice_with_a_fresh_home_and_no_xdg(tmp_path, home):
    """Both runs publish track events; the second finds the first's journal (its seq goes on) and `vigild ctl` and
    `vigild events` find the per-config control socket and journal from the config file alone."""
    env = readme_env(home, free_endpoint())
    first, _ = run_until_tracks(env, tmp_path / "first")

    state = home / ".local" / "state" / "vigild" / paths.config_key(ROOT / CONFIG)
    assert state == paths.state_dir(ROOT / CONFIG, env)
    for directory in (home / ".local" / "state" / "vigild", state, state / "snapshots", state / "run"):
        assert mode(directory) == 0o700, directory
    assert mode(state / "journal.db") == 0o600

    status: list[dict] = []

    def ask() -> None:
        done = subprocess.run(vigild_cli("ctl", "status"), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        status.append(json.loads(done.stdout))

    second, _ = run_until_tracks(env, tmp_path / "second", during=ask)
    seqs = [[e["seq"] for e in run if e["type"] != "heartbeat"] for run in (first, second)]  # heartbeats count apart
    assert min(seqs[1]) > max(seqs[0]), seqs  # seq goes on: the second run found the first's journal
    assert status and status[0], status

    done = subprocess.run(vigild_cli("events"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stored = {json.loads(line)["seq"] for line in done.stdout.splitlines()}
    assert set(seqs[0]) <= stored


def test_a_state_directory_left_at_0755_is_tightened_not_refused(tmp_path, home):
    root = home / ".local" / "state" / "vigild"
    root.mkdir(parents=True)
    root.chmod(0o755)
    _, log = run_until_tracks(readme_env(home, free_endpoint()), tmp_path / "run")
    assert mode(root) == 0o700
    assert f"{root} was open to other users (mode 0755): tightened to 0700" in log


def test_an_unprivileged_user_runs_it_from_a_copy_it_can_read(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root, to start the daemon as nobody with setpriv")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    nobody = pwd.getpwnam("nobody")
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import vigild"], cwd=ROOT, capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run this checkout's Python: {probe.stderr.decode(errors='replace')[-200:]}")
    readable = Path(tempfile.mkdtemp(prefix="vt-nobody-"))  # under /tmp: the test's own tmp_path is root's, 0700
    try:
        readable.chmod(0o755)
        config = readable / "vtest.yaml"
        shutil.copyfile(ROOT / CONFIG, config)
        config.chmod(0o644)
        home = readable / "h"
        home.mkdir()
        os.chown(home, nobody.pw_uid, nobody.pw_gid)
        env = readme_env(home, free_endpoint())
        run_until_tracks(env, tmp_path / "run", config=str(config), prefix=tuple(NOBODY))
        state = paths.state_dir(config, env)
        assert state.is_relative_to(home) and (state / "journal.db").stat().st_uid == nobody.pw_uid
        assert mode(state) == 0o700 and mode(state / "journal.db") == 0o600
    finally:
        shutil.rmtree(readable, ignore_errors=True)
