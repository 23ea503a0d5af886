"""The suite is hermetic: every test has a fresh HOME and no XDG_* or systemd directory variables, and a run that
changes the real HOME's vigild directories (or a fixed shared path) fails, naming what changed."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, bare_env, daemon_env
from hermetic import REAL_HOME, changes

from vigild import paths


def test_each_test_has_a_fresh_home_and_no_xdg_or_systemd_directories(hermetic_home):
    home = Path(os.environ["HOME"])
    assert home == hermetic_home and home != REAL_HOME and list(home.iterdir()) == []
    assert not [name for name in os.environ if name.startswith("XDG_")]
    assert "STATE_DIRECTORY" not in os.environ and "RUNTIME_DIRECTORY" not in os.environ
    # a daemon in the test's own process, and one it starts with no XDG variables, keep their state in that HOME
    assert home in paths.state_dir(None).parents and home in paths.runtime_dir(None).parents
    bare = bare_env()
    assert bare["HOME"] == str(home) and not [name for name in bare if name.startswith("XDG_")]
    env = daemon_env()
    assert env["HOME"] == str(home) and Path(env["XDG_STATE_HOME"]) != Path(daemon_env()["XDG_STATE_HOME"])


def test_two_tests_never_share_a_home(hermetic_home):
    (hermetic_home / "mark").write_text("")  # the test above saw an empty HOME whichever of the two ran first
    assert REAL_HOME not in hermetic_home.parents


def probe(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    """tests/hermetic_probe.py in a pytest of its own, whose "real" HOME is a directory of this test's."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "VT_PROBE": mode}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/hermetic_probe.py"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_run_that_writes_into_the_real_homes_vigild_state_fails_and_names_it(tmp_path):
    run = probe(tmp_path, "escape")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert f"created {tmp_path / 'home' / '.local'}\n" in run.stdout  # a new entry at HOME's top level
    assert f"created {tmp_path / 'home' / '.local' / 'state' / 'vigild' / 'control'}\n" in run.stdout  # to the file
    clean = probe(tmp_path, "stay")
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_a_segment_left_in_dev_shm_counts_but_one_a_live_process_holds_or_others_removed_does_not():
    path = f"/dev/shm/vigild-hermetic-{os.getpid()}-{secrets.token_hex(4)}"
    after = {path: (0, 0, 0)}
    try:
        with open(path, "w"):
            assert changes({}, after) == []  # a daemon running beside the suite holds it
        assert changes({}, after) == [f"created {path}"]  # nobody does: left behind
    finally:
        os.unlink(path)
    assert changes(after, {}) == []  # someone else's, gone: their business
    assert changes({"/run/vigild": (0o40700, 0, 1)}, {}) == ["removed /run/vigild"]


@pytest.mark.capture_modes
def test_a_capture_modes_test_runs_in_both_modes_and_its_daemons_see_which(capture_mode):
    expected = {"threads": "0", "workers": "2"}[capture_mode]
    assert os.environ["VIGILD_CAPTURE_WORKERS"] == expected and daemon_env()["VIGILD_CAPTURE_WORKERS"] == expected
