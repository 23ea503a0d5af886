"""vigild.paths: one rule for the state and runtime directories, and owner-only directories (issue 29, point 1)."""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import stat
from pathlib import Path

import pytest

from vigild import paths


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_directories_follow_one_rule(tmp_path):
    config = tmp_path / "cams.yaml"
    key = "cams-" + hashlib.sha1(str(config).encode(), usedforsecurity=False).hexdigest()[:8]
    home = {"HOME": "/home/ann"}
    assert paths.state_dir(config, home) == Path(f"/home/ann/.local/state/vigild/{key}")
    assert paths.runtime_dir(config, home) == Path(f"/home/ann/.local/state/vigild/{key}/run")
    assert paths.control_endpoint(config, home) == f"ipc:///home/ann/.local/state/vigild/{key}/run/control"
    assert paths.state_dir(config, {**home, "XDG_STATE_HOME": "/s"}) == Path(f"/s/vigild/{key}")
    assert paths.runtime_dir(config, {**home, "XDG_RUNTIME_DIR": "/run/user/7"}) == Path("/run/user/7/vigild")
    unit = {**home, "STATE_DIRECTORY": "/var/lib/vigild", "RUNTIME_DIRECTORY": "/run/vigild"}
    assert paths.state_dir(config, unit) == Path("/var/lib/vigild") and paths.runtime_dir(config, unit) == Path(
        "/run/vigild"
    )
    assert (paths.dir_mode(unit), paths.file_mode(unit), paths.dir_mode(home), paths.file_mode(home)) == (
        0o750, 0o640, 0o700, 0o600,
    )  # fmt: skip
    assert paths.state_dir(tmp_path / "other.yaml", home) != paths.state_dir(config, home)


def test_directories_are_made_owner_only_and_vigilds_own_are_tightened(tmp_path, caplog):
    env = {"HOME": str(tmp_path)}
    previous = os.umask(0o022)
    try:
        root = tmp_path / ".local" / "state" / "vigild"
        root.mkdir(parents=True)
        root.chmod(0o755)  # as every run before the rule left it
        state = paths.state_dir(tmp_path / "c.yaml", env)
        with caplog.at_level(logging.WARNING, "vigild.paths"):
            paths.private_dir(paths.runtime_dir(tmp_path / "c.yaml", env), env)
        assert mode(root) == mode(state) == mode(state / "run") == 0o700
        assert f"{root} was open to other users (mode 0755): tightened to 0700" in caplog.text

        chosen = tmp_path / "chosen"  # the user's own, outside vigild's roots: used, never chmodded
        chosen.mkdir(mode=0o755)
        paths.private_dir(chosen, env)
        assert mode(chosen) == 0o755
        made = tmp_path / "a" / "b"
        paths.private_dir(made, env)
        assert mode(made) == mode(made.parent) == 0o700
    finally:
        os.umask(previous)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="file is not a directory"):
        paths.private_dir(tmp_path / "file", env)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to make a directory of another user")
def test_a_directory_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(OSError, match="belongs to another user"):
        paths.private_dir(theirs, {"HOME": str(tmp_path)})


def test_a_socket_path_over_107_bytes_is_a_clear_error(tmp_path):
    paths.socket_path_fits(Path("/run/vigild/control"))
    with pytest.raises(OSError, match="over the 107 a unix socket allows; set XDG_RUNTIME_DIR"):
        paths.socket_path_fits(tmp_path / ("d" * 100) / "control")


def test_a_long_config_name_keeps_the_fallback_socket_within_a_unix_socket_path(tmp_path):
    """The per-config fallback directory cuts the config's stem, so an ordinary HOME and a long file name still give
    a control socket path a unix socket can hold (107 bytes)."""
    from vigild import paths

    config = tmp_path / ("front-door-camera-with-a-very-long-descriptive-name-" * 3 + ".yaml")
    env = {"HOME": "/home/somebody-with-a-long-login"}
    endpoint = paths.control_endpoint(config, env)
    assert endpoint.startswith("ipc:///home/somebody-with-a-long-login/.local/state/vigild/front-door-camera-with-a-")
    assert len(endpoint.removeprefix("ipc://").encode()) <= paths.MAX_SOCKET_PATH_BYTES
    assert paths.config_key(config) != paths.config_key(tmp_path / "other.yaml")
