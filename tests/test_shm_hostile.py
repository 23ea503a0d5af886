"""Frames between processes that no other local user can touch, and helpers that import nothing from the working
directory (issue 29): /dev/shm is writable by everyone, so files planted there under a daemon's names, of another
user or not, never stop a worker making its frame memory, are never mapped, never removed unless they are the
daemon's own, and never end the supervisor that restarts a dead worker; a `vigild/` package planted in the
directory the daemon is started from never runs in its capture workers or branch processes. Real processes, real
files in /dev/shm, real users (`nobody`, through setpriv, where the test runs as root)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import VTEST, daemon_env, free_endpoint, install_fake_distribution
from service import FRAME_ECHO, camera_yaml, frames_of, service_config

from vigild.capture import shm
from vigild.capture.exchange import FrameExchange
from vigild.capture.messages import WorkerHello as Hello
from vigild.capture.pool import CaptureWorkers
from vigild.capture.worker import ShmSink, Worker

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="a file of another user can be planted only as root (chown)")


def nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def plant():
    """Plant a file in /dev/shm (of `owner`, a uid, where given), removed after the test."""
    made: list[Path] = []

    def plant(name: str, owner: int | None = None, size: int = 1 << 20) -> Path:
        path = shm.SHM_DIR / name
        path.write_bytes(b"")
        os.truncate(path, size)
        if owner is not None:
            os.chown(path, owner, -1)
        made.append(path)
        return path

    yield plant
    for path in made:
        path.unlink(missing_ok=True)


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


# ----- planted names


def test_planted_files_under_every_name_a_worker_used_to_take_never_stop_it_making_frame_memory(plant):
    """Names were predictable (instance, worker, generation, capture, sequence: all readable in /dev/shm): another
    user planted the next ones and every `create` failed. Now each ends in a random token: 200 new segments of one
    camera (a size change each) are made past 200 planted old-style names, and other planted names, untouched."""
    hello = Hello(shm.new_instance_id(), worker=0, generation=1, slots=2, log_level="WARNING", cv2_threads=1)
    prefix = shm.worker_prefix(hello.instance, hello.worker, hello.generation)
    owner = nobody()[0] if os.geteuid() == 0 else None
    planted = [plant(f"{prefix}c1.{sequence}", owner, size=0) for sequence in range(1, 201)]
    planted += [plant(f"{prefix}c1.{sequence}.{'0' * 16}", owner, size=0) for sequence in range(1, 11)]
    planted.append(plant(f"{prefix}c1.1.", owner, size=0))
    sink = ShmSink(Worker(None, -1, hello), 1, "cam")  # type: ignore[arg-type]  (no daemon: only its memory)
    made: list[shm.Segment] = []
    try:
        for sequence in range(200):
            made.append(sink._new_segment((8 + sequence % 2 * 8, 8, 3)))
        names = {segment.name for segment in made}
        assert len(names) == 200 and all(name.startswith(f"{prefix}c1.") for name in names)
        for name in names:
            info = os.lstat(shm.SHM_DIR / name)
            assert info.st_uid == os.geteuid() and info.st_mode & 0o777 == 0o600, name
        assert all(path.exists() and os.lstat(path).st_size == 0 for path in planted)  # left as they were
    finally:
        for segment in made:
            shm.unlink(segment.name)


@ROOT_ONLY
def test_a_file_of_another_user_under_a_workers_name_is_never_mapped_nor_removed(plant):
    """What a worker names is mapped only if it is a regular file of the daemon's own user, and a cleanup removes
    only the daemon's own files: root could remove anyone's, and did."""
    instance = shm.new_instance_id()
    prefix = shm.worker_prefix(instance, 0, 1)
    foreign = plant(f"{prefix}c1.1", nobody()[0])
    with pytest.raises(ValueError, match="not a file of this user"):
        shm.Segment.attach(foreign.name, (8, 8, 3), 2, prefix)
    assert shm.unlink(foreign.name) is False and shm.unlink_prefix(prefix) == []
    assert foreign.exists() and foreign.stat().st_uid == nobody()[0]


@ROOT_ONLY
def test_foreign_files_under_a_daemons_names_are_left_alone_and_a_killed_worker_is_still_restarted(plant, tmp_path):
    """A pool as root, with files of `nobody` planted wherever it unlinks (the killed worker's segments, the next
    worker's, the instance's, a dead instance's): the supervisor restarts the SIGKILLed worker, the stop and the
    next start work, and every planted file is still there."""
    uid = nobody()[0]
    pool = CaptureWorkers(1, 2, FrameExchange(), tmp_path)
    dead = shm.new_instance_id()
    (tmp_path / "shm").mkdir(mode=0o700)
    (tmp_path / "shm" / f"{dead}.json").write_text("{}")  # a record whose daemon died: its lock is free
    planted = [
        plant(f"{shm.worker_prefix(pool.instance, 0, 1)}c1.1", uid),
        plant(f"{shm.worker_prefix(pool.instance, 0, 2)}c1.1", uid),
        plant(f"{shm.instance_prefix(pool.instance)}w7.1-c1.1", uid),
        plant(f"{shm.instance_prefix(dead)}w0.1-c1.1", uid),
    ]
    again = CaptureWorkers(1, 2, FrameExchange(), tmp_path)
    try:
        pool.start()
        handle = pool.handles[0]
        first = handle.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: handle.restarts == 1 and handle.pid != first, 60, "the killed worker's replacement")
        assert handle.process is not None and handle.process.poll() is None
        pool.stop()
        assert handle.process.poll() is not None
        again.start()  # its clean-up of the dead instance meets a planted file too
        assert not (tmp_path / "shm" / f"{dead}.json").exists()
        again.stop()
    finally:
        pool.stop()
        again.stop()
    assert [path for path in planted if not path.exists() or path.stat().st_uid != uid] == []


NOBODY_POOL = """
import json, os, signal, site, sys, time
from pathlib import Path

from vigild.capture.pool import CaptureWorkers
from vigild.capture.exchange import FrameExchange

runtime = Path(sys.argv[1])
if not os.access(sys.executable, os.X_OK):
    # this checkout's interpreter is behind a directory this user cannot enter (a pyenv under /root): its workers
    # start from a venv of this user's, on the base interpreter, that reads the checkout's packages
    venv = Path.home() / "venv"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(Path(sys.base_prefix) / "bin" / version)
    (venv / "pyvenv.cfg").write_text(f"home = {sys.base_prefix}/bin\\n")
    packages = venv / "lib" / version / "site-packages"
    packages.mkdir(parents=True)
    (packages / "checkout.pth").write_text(f"import site; site.addsitedir({site.getsitepackages()[0]!r})\\n")
    sys.executable = str(venv / "bin" / "python")
pool = CaptureWorkers(1, 2, FrameExchange(), runtime)
print(pool.instance, flush=True)
sys.stdin.readline()  # the test plants root's files under this instance's names
pool.start()
handle = pool.handles[0]
first = handle.pid
os.kill(first, signal.SIGKILL)
deadline = time.monotonic() + 60
while not (handle.restarts >= 1 and handle.pid != first) and time.monotonic() < deadline:
    time.sleep(0.05)
result = {"restarts": handle.restarts, "alive": handle.process.poll() is None}
pool.stop()
again = CaptureWorkers(1, 2, FrameExchange(), runtime)
again.start()
again.stop()
result["stale_record_left"] = any(runtime.glob("shm/*.json"))
print(json.dumps(result), flush=True)
"""


@ROOT_ONLY
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to run as nobody")
def test_a_file_the_daemons_user_may_not_remove_ends_neither_the_supervisor_nor_the_stop_nor_the_next_start(plant):
    """The finding as it was: the daemon's user is not root, and another user (here root) planted files under its
    names. Removing them is a PermissionError, which ended the supervisor (the killed worker was never restarted)
    and made the stop and the next start fail."""
    uid, gid = nobody()
    home = Path(tempfile.mkdtemp(prefix="vt-nobody-"))
    try:
        os.chown(home, uid, gid)
        (home / "pool.py").write_text(NOBODY_POOL)
        runtime = home / "run"
        command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", sys.executable, "pool.py", str(runtime)]
        env = {**daemon_env(), "HOME": str(home)}
        with subprocess.Popen(command, cwd=home, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as process:  # fmt: skip
            assert process.stdout is not None and process.stdin is not None
            instance = process.stdout.readline().strip()
            assert instance, process.communicate(timeout=60)[1][-3000:]
            dead = shm.new_instance_id()
            (runtime / "shm").mkdir(parents=True, mode=0o700)
            record = runtime / "shm" / f"{dead}.json"
            record.write_text("{}")
            for path in (runtime, runtime / "shm", record):
                os.chown(path, uid, gid)
            planted = [
                plant(f"{shm.worker_prefix(instance, 0, 1)}c1.1"),
                plant(f"{shm.instance_prefix(instance)}w7.1-c1.1"),
                plant(f"{shm.instance_prefix(dead)}w0.1-c1.1"),
            ]
            out, err = process.communicate("planted\n", timeout=120)
        assert process.returncode == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1]) == {"restarts": 1, "alive": True, "stale_record_left": False}, err
        assert all(path.exists() for path in planted)
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ----- helpers import only the installed vigild


PLANTED = 'open({marker!r}, "w").write("ran")\n'


@pytest.mark.e2e
def test_a_vigild_package_planted_in_the_daemons_working_directory_never_runs_in_its_helpers(
    tmp_path, subscriber_factory
):
    """`python -m` put the working directory first on a helper's sys.path: a `vigild/capture/worker.py` planted in
    the directory the daemon was started from ran in every capture worker. The daemon started as the README does
    (the `vigild` command) from a directory with a whole planted `vigild` package, with a capture worker and a
    branch in a process of its own: nothing planted runs, and frames go through both."""
    cwd = tmp_path / "cwd"
    modules = ("__init__", "capture/__init__", "capture/worker", "pipeline/__init__", "pipeline/branch_process")
    markers = {module: tmp_path / f"ran-{module.replace('/', '.')}" for module in modules}
    for module, marker in markers.items():
        path = cwd / "vigild" / f"{module}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PLANTED.format(marker=str(marker)))
    site = tmp_path / "site"
    install_fake_distribution(site, "frame_echo = acme_frame_echo:FrameEcho\n", {"acme_frame_echo": FRAME_ECHO})
    endpoint = free_endpoint()
    plugins = "  - type: frame_echo\n  - type: frame_echo\n    id: apart\n    branch: process\n    kind: branch_frame\n"
    config = service_config(tmp_path, camera_yaml("cam", VTEST, loop=True), endpoint, plugins=plugins,
                            extra="capture:\n  workers: 1\n", await_subscribers=1)  # fmt: skip
    subscriber = subscriber_factory(endpoint)
    log = tmp_path / "daemon.log"
    command = [str(Path(sys.executable).parent / "vigild"), "run", "--config", str(config)]
    with log.open("w") as stderr:
        daemon = subprocess.Popen(command, cwd=cwd, env=daemon_env(PYTHONPATH=str(site)), stderr=stderr, text=True)
    try:
        subscriber.wait_for(
            lambda ms: any(marker.exists() for marker in markers.values())
            or (len(frames_of(ms, "cam")) >= 5 and sum(m["event"]["type"] == "branch_frame" for m in ms) >= 3),
            timeout=120,
        )
        assert [marker.name for marker in markers.values() if marker.exists()] == []
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    assert "frames in shared memory vigild-" in log.read_text()  # (capture ran in a worker)
