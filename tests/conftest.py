"""Shared test fixtures: real media and weights from ../shared, free loopback ports, the daemon as a process."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import hermetic
import numpy as np
import pytest
from hermetic import pytest_sessionstart, pytest_terminal_summary  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VIGILD_SHARED", ROOT.parent / "shared")).resolve()
MEDIA = SHARED / "media"
MODELS = SHARED / "models"
VTEST = MEDIA / "vtest.avi"
YOLO_FASTEST = MODELS / "yolo-fastest-1.1"

if not VTEST.is_file() or not (YOLO_FASTEST / "yolo-fastest-1.1-xl.weights").is_file():
    raise pytest.UsageError(f"tests need the shared media and models beside the checkout; not found under {SHARED}")


def yolo_fastest(confidence: float = 0.3):
    """The shared Yolo-Fastest-XL as a person detector, at 320: the detector the end-to-end tests run."""
    from vigild.plugins.detection.detector import DetectorConfig

    return DetectorConfig(
        backend="darknet",
        cfg=YOLO_FASTEST / "yolo-fastest-1.1-xl.cfg",
        weights=str(YOLO_FASTEST / "yolo-fastest-1.1-xl.weights"),
        names=YOLO_FASTEST / "coco.names",
        classes=["person"],
        confidence=confidence,
        input_size=320,
    )


def yolo_fastest_yaml(confidence: float = 0.3) -> str:
    """The same detector as an entry of a config file's `plugins:` list (indented for it)."""
    return f"""\
  - type: detector
    backend: darknet
    cfg: {YOLO_FASTEST}/yolo-fastest-1.1-xl.cfg
    weights: {YOLO_FASTEST}/yolo-fastest-1.1-xl.weights
    names: {YOLO_FASTEST}/coco.names
    classes: [person]
    confidence: {confidence}
    input_size: 320"""


def write_video(images: list[np.ndarray], path: Path, fps: float) -> Path:
    """Frames to an MJPEG .avi at high quality, for the daemon to read as a file source."""
    import cv2

    height, width = images[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 95)
    for image in images:
        writer.write(image)
    writer.release()
    return path


@lru_cache(maxsize=1)
def plaza() -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """vtest.avi's plaza without people (the median of every 8th frame), and two people cut from its first frame
    (86 px tall), for scenes rendered with ground truth."""
    import cv2

    capture = cv2.VideoCapture(str(VTEST))
    sampled, index = [], 0
    while True:
        ok, image = capture.read()
        if not ok:
            break
        if index % 8 == 0:
            sampled.append(image)
        index += 1
    background = np.median(np.stack(sampled), axis=0).astype(np.uint8)
    first = sampled[0]
    return background, (first[240:326, 646:678].copy(), first[225:311, 255:279].copy())


def journal_record(body: dict, jpeg: bytes | None = None):
    """A journal record made from an event's wire body, as the bus would have stamped it (the journal itself never
    parses what it stores: it takes the columns from the event)."""
    import json

    from vigild.outputs.journal import Record, epoch

    obj = body.get("object") or {}
    return Record(body["seq"], body["id"], body["run"], epoch(body["ts"]), body["camera"], body["type"],
                  json.dumps(body, separators=(",", ":")).encode(), obj.get("track_id"), obj.get("label"), jpeg)  # fmt: skip


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def install_fake_distribution(site: Path, entry_points: str, modules: dict[str, str]) -> None:
    """A real (if minimal) installed distribution: a .dist-info with entry_points.txt, found by importlib.metadata."""
    info = site / "acme_vigild_plugins-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-vigild-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[vigild.plugins]\n{entry_points}")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(source)


SUITE_DIR = tempfile.mkdtemp(prefix="vt-")
"""Everything of this session's outside pytest's tmp_path, removed at its end (conftest's pytest_sessionfinish).
Short, for socket paths; not named vigild*, which the session guard (hermetic.py) watches in /tmp."""


os.chmod(SUITE_DIR, 0o711)  # traversable: a test may run a daemon as another user (setpriv) with files in it


def _suite_dir(name: str, mode: int = 0o700) -> str:
    os.mkdir(path := os.path.join(SUITE_DIR, name))
    os.chmod(path, mode)
    return path


RUNTIME_DIR = _suite_dir("run")
"""$XDG_RUNTIME_DIR of every daemon the tests start through daemon_env(): their default control socket is the suite's
own, so a `vigild` already running on the machine (a `make demo`, another checkout's suite) cannot collide with it."""

STATE_DIR = _suite_dir("state")
"""Where the daemons started through daemon_env() keep their journals by default (each its own $XDG_STATE_HOME)."""

HOMES = _suite_dir("home")
"""The suite's HOMEs: one for the session (module- and session-scoped fixtures), and a fresh one for every test."""

# temporary files of the tests and of everything they start go in the suite's own directory, so that the guard's
# /tmp/vigild* can only be a fixed path (a suite running beside this one keeps its temporary files to itself too);
# pytest's tmp_path stays where it was (/tmp/pytest-of-<user>: socket paths in it must stay short)
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
os.environ["TMPDIR"] = tempfile.tempdir = _suite_dir("tmp", 0o1777)  # as /tmp: for every user, sticky

HERMETIC_UNSET = ("STATE_DIRECTORY", "RUNTIME_DIRECTORY")
"""systemd's variables (which come before XDG's): unset like every XDG_* variable unless a test sets them itself."""


def _hermetic(environ, home: str) -> None:
    """A fresh HOME, and no XDG_*, STATE_DIRECTORY or RUNTIME_DIRECTORY: defaults as on a new user's machine."""
    environ["HOME"] = home
    for name in [name for name in environ if name.startswith("XDG_") or name in HERMETIC_UNSET]:
        del environ[name]


# the session's own HOME from import on (module-scoped fixtures run before the per-test one below); GStreamer's
# registry kept once for the suite, not rebuilt under every fresh HOME (0.7 s each daemon start)
_hermetic(os.environ, tempfile.mkdtemp(dir=HOMES, prefix="session-"))
os.environ["GST_REGISTRY"] = os.path.join(HOMES, "gstreamer-registry.bin")


def pytest_sessionfinish(session, exitstatus) -> None:
    hermetic.pytest_sessionfinish(session, exitstatus)
    shutil.rmtree(SUITE_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def hermetic_home(request, monkeypatch) -> Path:
    """Every test: a fresh HOME with XDG_*, STATE_DIRECTORY and RUNTIME_DIRECTORY unset (a test that wants them sets
    them itself), so that nothing a test runs in its own process, or starts with os.environ, reaches the real HOME.
    A capture_modes test's daemons run with capture in worker processes in its [workers] variant, in their own
    threads in its [threads] variant (whatever `capture.workers: auto` would choose on this machine)."""
    mode = getattr(request.node, "callspec", None) and request.node.callspec.params.get("capture_mode")
    if mode:
        monkeypatch.setenv("VIGILD_CAPTURE_WORKERS", CAPTURE_WORKERS if mode == "workers" else "0")
    home = Path(tempfile.mkdtemp(dir=HOMES, prefix="t-"))
    monkeypatch.setenv("HOME", str(home))
    for name in [name for name in os.environ if name.startswith("XDG_") or name in HERMETIC_UNSET]:
        monkeypatch.delenv(name)
    return home


def daemon_env(**extra: str) -> dict[str, str]:
    """The environment of a daemon a test starts: the test's HOME, the suite's $XDG_RUNTIME_DIR and each call a fresh
    $XDG_STATE_HOME, so that each daemon's default journal is its own (a test that wants two runs on one journal
    names `journal.path`). A test of the defaults without XDG (as the README runs it) pops XDG_RUNTIME_DIR and
    XDG_STATE_HOME from it, or uses bare_env()."""
    env = bare_env()
    env.update(XDG_RUNTIME_DIR=RUNTIME_DIR, XDG_STATE_HOME=tempfile.mkdtemp(dir=STATE_DIR))
    env.update(extra)
    return env


def bare_env(**extra: str) -> dict[str, str]:
    """A daemon's environment as a new user's shell has it: the test's fresh HOME, no XDG_*, no systemd variables."""
    env = dict(os.environ)
    _hermetic(env, env["HOME"])
    env.update(VIGILD_MEDIA=str(MEDIA), VIGILD_MODELS=str(MODELS), YOLO_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def vigild(*args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen[str]:
    """Start the installed CLI as a user would (`python -m vigild` is the same entry point as `vigild`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "vigild", *args],
        env=env or daemon_env(),
        cwd=ROOT,
        text=True,
        **popen,  # type: ignore[call-overload]
    )


@pytest.fixture
def endpoint() -> str:
    return free_endpoint()


class PlainSubscriber:
    """tests/plain_subscriber.py in its own process, writing what it receives to a file."""

    def __init__(self, endpoint: str, out: Path, idle_s: float = 5.0):
        self.out = out
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "plain_subscriber.py"), endpoint, str(out), str(idle_s)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    def messages(self) -> list[dict]:
        import json

        if not self.out.exists():
            return []
        lines = self.out.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_for(self, predicate, timeout: float) -> list[dict]:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            messages = self.messages()
            if predicate(messages):
                return messages
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s; got {len(self.messages())} messages")

    def finish(self, timeout: float = 30) -> list[dict]:
        self.process.wait(timeout)
        return self.messages()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def subscriber_factory(tmp_path):
    started: list[PlainSubscriber] = []

    def start(endpoint: str, idle_s: float = 5.0) -> PlainSubscriber:
        subscriber = PlainSubscriber(endpoint, tmp_path / f"events-{len(started)}.jsonl", idle_s)
        started.append(subscriber)
        return subscriber

    yield start
    for subscriber in started:
        subscriber.kill()


@pytest.fixture(scope="session")
def encoded_media(tmp_path_factory) -> dict[str, Path]:
    """vtest.avi's first 400 frames (40 s at 10 fps) as H.264 and H.265 MP4s, for the stream servers."""
    from streams import encode

    folder = tmp_path_factory.mktemp("encoded")
    return {codec: encode(VTEST, folder / f"vtest_{codec}.mp4", codec, 400) for codec in ("h264", "h265")}


@pytest.fixture(scope="session")
def rtsp_server(encoded_media):
    """One RTSP server for the session, serving /h264 and /h265 (tests that kill servers start their own)."""
    from streams import RtspServer

    server = RtspServer({"/h264": encoded_media["h264"], "/h265": encoded_media["h265"]}).start()
    yield server
    server.kill()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs the test mounts (a real full file system: ENOSPC from the kernel). Mounting needs root, which
    this project's machines and CI have; elsewhere the test says so and is skipped."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path = tmp_path / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory) -> None:
    """Take every free byte of the file system (4 KiB at a time until the kernel says ENOSPC)."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


CAPTURE_MODES_ELSEWHERE = {
    "test_service.py": (
        "test_notify_reload_as_a_diff_and_graceful_stop",
        "test_capture_waits_for_the_awaited_subscriber_which_then_gets_the_first_frame",
        "test_watchdog_pings_stop_while_a_plugin_hangs_and_resume_after",
        "test_control_commands_metrics_and_fuzz",
        "test_a_subscriber_that_never_reads_loses_only_its_own_events_and_memory_stays_bounded",
    ),
    "test_control_security.py": (
        "test_a_camera_removed_and_added_again_starts_from_zero",
        "test_a_slow_reload_or_camera_change_never_holds_up_status",
        "test_a_change_sent_while_the_daemon_starts_is_busy_and_the_daemon_starts",
    ),
}
"""capture_modes tests in files whose tests are written by others as well (marked here, by name; a name that is gone
is an error, so that a rename cannot quietly drop a test from `make e2e-workers`)."""


CAPTURE_WORKERS = "2"
"""VIGILD_CAPTURE_WORKERS of the `workers` variants (it decides `capture.workers: auto`)."""


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "capture_modes: the behaviour goes through capture: the test runs twice, [threads] and [workers] (capture "
        "in worker processes: VIGILD_CAPTURE_WORKERS=2)",
    )
    config.addinivalue_line("markers", "capture_workers: the [workers] variant of a capture_modes test")


def pytest_generate_tests(metafunc) -> None:
    """Each capture_modes test in both capture modes, in one session (session fixtures made once)."""
    definition = metafunc.definition
    elsewhere = metafunc.function.__name__ in CAPTURE_MODES_ELSEWHERE.get(definition.path.name, ())
    if elsewhere or definition.get_closest_marker("capture_modes"):
        metafunc.fixturenames.append("capture_mode")
        modes = ["threads", pytest.param("workers", marks=pytest.mark.capture_workers)]
        metafunc.parametrize("capture_mode", modes)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    collected: dict[str, set[str]] = {}
    for item in items:
        names = CAPTURE_MODES_ELSEWHERE.get(item.path.name)
        if names is None:
            continue
        name = getattr(item, "originalname", item.name)
        collected.setdefault(item.path.name, set()).add(name)
        if name in names:
            item.add_marker(pytest.mark.capture_modes)
    whole_files = not any("::" in arg for arg in config.args)
    for module, found in collected.items():
        if whole_files and (missing := set(CAPTURE_MODES_ELSEWHERE[module]) - found):
            raise pytest.UsageError(f"conftest.CAPTURE_MODES_ELSEWHERE names tests {module} no longer has: {missing}")
