"""Capture workers (issue 17) through real `vigild run` processes: a worker killed costs only its cameras, frames
through shared memory are the frames a capture thread would deliver (every one of a file, at the size they come),
and nothing of a daemon is left in /dev/shm after a clean stop, after a SIGKILL and the next start, or when the
daemon alone is killed and its workers find themselves alone. Processes and segments are found from outside: /proc
and /dev/shm, as an operator would, not from the daemon's own status."""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from conftest import RUNTIME_DIR, VTEST, daemon_env, free_endpoint, install_fake_distribution, vigild
from service import FRAME_ECHO, camera_yaml, frames_of, gaps, service_config
from streams import count_frames
from test_e2e import events_of

from vigild.capture import shm
from vigild.capture.camera import CameraCapture
from vigild.capture.exchange import FrameExchange
from vigild.capture.messages import CaptureStopped
from vigild.capture.pool import CaptureWorkers, Doorbell, RemoteCapture
from vigild.config.settings import CameraConfig
from vigild.config.sources import parse_source

pytestmark = pytest.mark.e2e

RECORDS = Path(RUNTIME_DIR) / "vigild" / "shm"
"""Where the suite's daemons (XDG_RUNTIME_DIR=RUNTIME_DIR) keep their shared-memory records."""

# Reports what reached the chain: each frame's index, shape and a CRC of its pixels (to compare with a capture
# thread's frames of the same file, decoded by the same back end in the test process).
FRAME_CHECK = """
import zlib
from typing import Literal

import numpy as np

from vigild.events import Event
from vigild.plugin import Plugin, PluginConfig


class FrameCheckConfig(PluginConfig):
    type: Literal["frame_check"] = "frame_check"


class FrameCheck(Plugin[FrameCheckConfig]):
    Config = FrameCheckConfig

    def process(self, frames):
        for frame in frames:
            image = frame.image
            data = {"shape": list(image.shape), "crc": zlib.crc32(np.ascontiguousarray(image))}
            frame.events.append(Event("frame", frame.camera, frame.ts_wall, frame.index, data=data))
"""

INSTANCE_LINE = re.compile(r"frames in shared memory vigild-([0-9a-f]+)-\*")


# ----- processes and segments, from /proc and /dev/shm


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet has exited)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def worker_pids(daemon_pid: int) -> list[int]:
    """The daemon's children that run `vigild.capture.worker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is None or stat[1] != daemon_pid or stat[0] == "Z":
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vigild.capture.worker" in argv:
            found.append(int(entry))
    return sorted(found)


def segments(instance: str) -> set[str]:
    """The instance's segments in /dev/shm."""
    return {name for name in os.listdir(shm.SHM_DIR) if name.startswith(f"vigild-{instance}-")}


def mapped_segments(pid: int, instance: str) -> set[str]:
    """The instance's segments a process has mapped (and that still exist)."""
    prefix = f"{shm.SHM_DIR}/vigild-{instance}-"
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1]
        if path.startswith(prefix) and not path.endswith("(deleted)"):
            names.add(path.rsplit("/", 1)[1])
    return names


def record(instance: str) -> Path:
    return RECORDS / f"{instance}.json"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# ----- a daemon


class Daemon:
    """`vigild run` with capture workers and the test plugins installed; `own_group`: in a process group of its own
    (with its workers), so that a test can kill the whole of it as a crash of the service would."""

    def __init__(
        self,
        folder: Path,
        cameras: str,
        workers: int,
        *,
        plugins: str = "  - type: frame_echo\n",
        await_subscribers: int = 0,
        own_group: bool = False,
    ):
        folder.mkdir(mode=0o700, exist_ok=True)  # (the control socket needs an owner-only directory)
        site = folder / "site"
        if not site.exists():
            entry_points = "frame_echo = acme_frame_echo:FrameEcho\nframe_check = acme_frame_check:FrameCheck\n"
            install_fake_distribution(
                site, entry_points, {"acme_frame_echo": FRAME_ECHO, "acme_frame_check": FRAME_CHECK}
            )
        self.publisher = free_endpoint()
        self.config = service_config(
            folder,
            cameras,
            self.publisher,
            plugins=plugins,
            # (the runtime directory is the suite's, shared by daemons side by side: each its own replay socket)
            extra=f"capture:\n  workers: {workers}\njournal:\n  replay_endpoint: ipc://{folder}/replay\n",
            await_subscribers=await_subscribers,
        )
        self.log = folder / "daemon.log"
        with self.log.open("a") as log:
            self.process = vigild(
                "run",
                "--config",
                str(self.config),
                env=daemon_env(PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))),
                stderr=log,
                start_new_session=own_group,
            )
        self._log_from = self.log.stat().st_size

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text()[self._log_from :]

    def instance(self, timeout: float = 120) -> str:
        """Its instance id, from the log line that says the workers run (after the start's cleanup)."""
        deadline = time.monotonic() + timeout
        while True:
            found = INSTANCE_LINE.search(self.log_text())
            if found:
                return found.group(1)
            assert self.process.poll() is None, f"the daemon exited: {self.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no workers after {timeout} s: {self.log_text()[-3000:]}"
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """Cleanup: the daemon and, if it has its own group, its workers."""
        if self.process.poll() is None:
            if self.process.pid == os.getpgid(self.process.pid):
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        self.process.wait()


def frames_after(messages: list[dict], camera: str, seq: int) -> list[int]:
    return [
        m["event"]["frame"] for m in messages[seq:] if m["event"]["type"] == "frame" and m["event"]["camera"] == camera
    ]


def lifecycle(messages: list[dict], camera: str) -> list[tuple[str, str | None]]:
    """The camera's camera.up/down events in order: (type, reason)."""
    return [
        (m["event"]["type"], m["event"].get("reason"))
        for m in messages
        if m["event"]["camera"] == camera and m["event"]["type"] in ("camera.up", "camera.down")
    ]


def in_process_frames(source: Path) -> list[tuple[tuple[int, ...], int]]:
    """(shape, CRC) of every frame of a file as a capture thread in this process delivers it: the ground truth for
    what a worker hands over (same back end, same decoder)."""
    import zlib

    config = CameraConfig(source=str(source), realtime=False)
    exchange = FrameExchange()
    capture = CameraCapture("truth", config, parse_source(config.source), exchange)
    capture.start()
    seen: list[tuple[tuple[int, ...], int]] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            taken = exchange.take(8, 0, 1, 0.2)
            for frame in taken.frames:
                assert frame.index == len(seen)
                seen.append((frame.image.shape, zlib.crc32(np.ascontiguousarray(frame.image))))
            if any(notice.detail.get("reason") == "end_of_stream" for notice in taken.closed):
                return seen
        raise AssertionError("the file did not end within 120 s")
    finally:
        capture.stop()
        exchange.close()
        capture.join(5)


# ----- the tests


CAMERAS = ["a", "b", "c", "d"]


def test_a_killed_worker_costs_only_its_cameras_and_a_clean_stop_leaves_nothing(tmp_path, subscriber_factory):
    cameras = "".join(camera_yaml(name, VTEST, loop=True) for name in CAMERAS)
    daemon = Daemon(tmp_path, cameras, workers=2, await_subscribers=1)
    try:
        subscriber = subscriber_factory(daemon.publisher, idle_s=5)
        instance = daemon.instance()
        subscriber.wait_for(lambda ms: all(len(frames_of(ms, c)) >= 10 for c in CAMERAS), timeout=120)

        # 4 cameras over 2 workers, 2 each: each worker maps the segments of the cameras it serves
        workers = worker_pids(daemon.pid)
        assert len(workers) == 2, workers
        wait_until(lambda: len(segments(instance)) == 4, 30, "a segment per camera")
        assert record(instance).is_file()
        served = {pid: mapped_segments(pid, instance) for pid in workers}
        assert sorted(len(names) for names in served.values()) == [2, 2], served

        victim, survivor = workers
        os.kill(victim, signal.SIGKILL)
        died = subscriber.wait_for(
            lambda ms: len([e for e in events_of(ms, "camera.down") if e.get("reason") == "worker_died"]) >= 2,
            timeout=60,
        )
        killed = sorted(e["camera"] for e in events_of(died, "camera.down") if e.get("reason") == "worker_died")
        assert len(killed) == 2 and len(set(killed)) == 2, killed
        others = [c for c in CAMERAS if c not in killed]
        # each of its cameras comes back (in a new worker) and every camera streams on
        back = subscriber.wait_for(lambda ms: all(len(events_of(ms, "camera.up", c)) >= 2 for c in killed), timeout=60)
        mark = len(back)
        subscriber.wait_for(lambda ms: all(len(frames_after(ms, c, mark)) >= 20 for c in CAMERAS), timeout=60)
        restarted = worker_pids(daemon.pid)
        assert len(restarted) == 2 and victim not in restarted and survivor in restarted, (workers, restarted)
        assert not alive(victim)

        assert daemon.stop() == 0, daemon.log_text()[-3000:]
        # nothing left: no worker, no segment, no record
        assert not any(alive(pid) for pid in restarted)
        assert segments(instance) == set()
        assert not record(instance).exists()
    finally:
        daemon.kill()
    messages = subscriber.finish(timeout=60)

    for camera in killed:  # one down for the worker's death, one up, and the down of the stop
        assert lifecycle(messages, camera) == [
            ("camera.up", None),
            ("camera.down", "worker_died"),
            ("camera.up", None),
            ("camera.down", "stopped"),
        ], (camera, lifecycle(messages, camera))
        indices = frames_of(messages, camera)
        assert all(b > a for a, b in itertools.pairwise(indices)), f"{camera}: frame numbers went back"
    for camera in others:  # the other worker's cameras never noticed: no down until the stop, no frame missing
        seen = lifecycle(messages, camera)
        assert seen == [("camera.up", None), ("camera.down", "stopped")], (camera, seen)
        indices = frames_of(messages, camera)
        assert indices[0] == 0 and gaps(indices) == [], (camera, gaps(indices)[:5])
        assert len(indices) >= 30


def test_a_start_after_sigkill_removes_exactly_what_the_killed_daemon_left(tmp_path, subscriber_factory):
    """Daemon A is killed with its workers (SIGKILL to its process group: nothing of it runs to clean up); the next
    start removes A's segments and record, and only those: daemon B, running beside it in the same runtime directory
    all along, keeps its segments and its record and streams on without a gap. Then B alone is killed (not its
    workers): they see the socket close, unlink their segments and exit by themselves."""
    beside = None
    crashed = restarted = None
    try:
        beside = Daemon(tmp_path / "b", camera_yaml("b", VTEST, loop=True), workers=1, await_subscribers=1)
        b_events = subscriber_factory(beside.publisher, idle_s=5)
        b_instance = beside.instance()
        crashed = Daemon(tmp_path / "a", camera_yaml("a1", VTEST, loop=True) + camera_yaml("a2", VTEST, loop=True),
                         workers=2, own_group=True)  # fmt: skip
        a_instance = crashed.instance()
        wait_until(
            lambda: len(segments(a_instance)) == 2 and len(segments(b_instance)) == 1, 60, "both daemons' segments"
        )
        b_events.wait_for(lambda ms: len(frames_of(ms, "b")) >= 10, timeout=60)
        a_workers, b_workers = worker_pids(crashed.pid), worker_pids(beside.pid)
        assert len(a_workers) == 2 and len(b_workers) == 1
        b_segments = segments(b_instance)

        os.killpg(crashed.pid, signal.SIGKILL)
        crashed.process.wait(30)
        wait_until(lambda: not any(alive(pid) for pid in a_workers), 30, "the killed daemon's workers to be gone")
        left = segments(a_instance)
        assert len(left) == 2 and record(a_instance).is_file()  # what a crash leaves

        restarted = Daemon(tmp_path / "a", camera_yaml("a1", VTEST, loop=True), workers=1)
        new_instance = restarted.instance()
        assert new_instance not in (a_instance, b_instance)
        assert segments(a_instance) == set() and not record(a_instance).exists()
        removed = re.findall(
            rf"removed (\d+) shared-memory segment\(s\) left by vigild instance {a_instance}\b", restarted.log_text()
        )
        assert removed == [str(len(left))], restarted.log_text()[-3000:]
        assert b_instance not in restarted.log_text()
        # B untouched: its record, its segments, its worker, and its frames keep coming
        assert record(b_instance).is_file() and segments(b_instance) >= b_segments
        assert worker_pids(beside.pid) == b_workers
        mark = len(b_events.messages())
        b_events.wait_for(lambda ms: len(frames_after(ms, "b", mark)) >= 20, timeout=60)
        wait_until(lambda: len(segments(new_instance)) == 1, 60, "the new daemon's segment")
        assert restarted.stop() == 0, restarted.log_text()[-3000:]
        assert segments(new_instance) == set() and not record(new_instance).exists()

        # B's daemon alone is killed: its worker notices, unlinks B's segments and exits
        assert segments(b_instance)
        beside.process.kill()
        beside.process.wait(30)
        wait_until(lambda: not any(alive(pid) for pid in b_workers), 60, "the orphaned worker to exit")
        assert segments(b_instance) == set()
        assert record(b_instance).is_file()  # (a dead daemon's record: the next start removes it, as here)
        removed_now = shm.remove_stale(RECORDS)
        assert not [name for name in removed_now if name.startswith(f"vigild-{b_instance}-")]
        assert not record(b_instance).exists()
    finally:
        for daemon in (beside, crashed, restarted):
            if daemon is not None:
                daemon.kill()
    b_frames = frames_of(b_events.finish(timeout=60), "b")
    assert b_frames[0] == 0 and gaps(b_frames) == [], gaps(b_frames)[:5]


@pytest.fixture(scope="module")
def size_change(tmp_path_factory: pytest.TempPathFactory):
    from streams import encode_size_change

    return encode_size_change(VTEST, tmp_path_factory.mktemp("sizes") / "sizes.h264", ((768, 576), (384, 288)), 30)


def run_to_end(folder: Path, source: Path, subscriber_factory) -> tuple[list[dict], str]:
    """One `realtime: false` camera through one worker, with FRAME_CHECK, until the daemon ends by itself; the
    events and the daemon's instance id. Nothing of the instance may be left after it."""
    daemon = Daemon(folder, camera_yaml("cam", source, realtime=False), workers=1,
                    plugins="  - type: frame_check\n", await_subscribers=1)  # fmt: skip
    try:
        subscriber = subscriber_factory(daemon.publisher, idle_s=5)
        instance = daemon.instance()
        assert daemon.process.wait(300) == 0, daemon.log_text()[-3000:]  # the file ended, so did the daemon
    finally:
        daemon.kill()
    assert segments(instance) == set() and not record(instance).exists()
    return subscriber.finish(timeout=60), instance


def frame_checks(messages: list[dict], camera: str) -> list[tuple[int, tuple[int, ...], int]]:
    return [
        (e["frame"], tuple(e["shape"]), e["crc"])
        for e in (m["event"] for m in messages)
        if e["type"] == "frame" and e["camera"] == camera
    ]


def test_a_camera_whose_frame_size_changes_is_delivered_at_the_new_size_through_a_worker(
    tmp_path, size_change, subscriber_factory
):
    path, (first, second) = size_change
    truth = in_process_frames(path)
    assert [shape for shape, _ in truth] == [(576, 768, 3)] * first + [(288, 384, 3)] * second
    messages, _ = run_to_end(tmp_path, path, subscriber_factory)
    delivered = frame_checks(messages, "cam")
    assert [index for index, _, _ in delivered] == list(range(first + second))
    assert [shape for _, shape, _ in delivered] == [shape for shape, _ in truth]
    assert [crc for _, _, crc in delivered] == [crc for _, crc in truth]  # the same pixels as a capture thread's
    assert lifecycle(messages, "cam") == [("camera.up", None), ("camera.down", "end_of_stream")]


def test_a_fast_file_through_a_worker_delivers_every_frame_in_order_then_the_daemon_ends(tmp_path, subscriber_factory):
    total = count_frames(VTEST)  # by OpenCV, independent of the daemon's reader
    truth = in_process_frames(VTEST)
    assert len(truth) == total
    messages, _ = run_to_end(tmp_path, VTEST, subscriber_factory)
    delivered = frame_checks(messages, "cam")
    assert [index for index, _, _ in delivered] == list(range(total))
    # every frame's own pixels: no slot was written again while the chain still had its frame
    wrong = [index for (index, _, crc), (_, expected) in zip(delivered, truth, strict=True) if crc != expected]
    assert wrong == [], f"{len(wrong)} frames with other pixels than the file's, first {wrong[:5]}"
    assert lifecycle(messages, "cam") == [("camera.up", None), ("camera.down", "end_of_stream")]
    assert events_of(messages, "camera.down", "cam")[0]["frame"] == total - 1


def test_a_slot_goes_back_to_the_worker_only_when_the_last_view_of_its_image_goes(tmp_path):
    """Daemon side of a worker's frame, without processes: the pool maps the worker's segment, puts the frame in
    the exchange, and the slot is FREE again once nothing refers to the image (a slice kept by a plugin counts);
    a frame the exchange replaces (latest-frame semantics) gives its slot back at once."""
    shape, slots = (48, 64, 3), 4
    exchange = FrameExchange()
    pool = CaptureWorkers(1, slots, exchange, tmp_path)  # (not started: no process, no record)
    handle = pool.handles[0]
    handle.generation = 1  # as after its first start
    name = str(shm.SegmentName(pool.instance, 0, 1, 1, 1))
    writer = shm.Segment.create(name, shape, slots)  # the worker's mapping
    bell = Doorbell()

    def send(rc: RemoteCapture, slot: int, index: int, value: int) -> None:
        writer.image(slot)[:] = value
        writer.states[slot] = shm.SENT
        rc.deliver(bell, name, slots, shape, slot, index, time.time(), time.monotonic(), None)

    def rings() -> int:
        try:
            return int.from_bytes(os.read(bell.fd, 8), "little")
        except BlockingIOError:
            return 0

    try:
        # a file read as fast as the chain goes: the worker waits for its consumer
        config = CameraConfig(source=str(VTEST), realtime=False)
        rc = RemoteCapture(handle, 1, "cam", config, parse_source(config.source))
        send(rc, 2, 0, 7)
        taken = exchange.take(8, 0, 1, 1.0)
        [frame] = taken.frames
        assert writer.states[2] == shm.TAKEN and rings() == 1  # taken: the worker may send the next one
        assert not frame.image.flags.writeable and (frame.image == 7).all()
        writer.image(2)[10, 20] = 99  # the same memory, not a copy
        assert frame.image[10, 20, 0] == 99
        kept = frame.image[8:16, 16:32]
        finalized = weakref.ref(frame)
        del frame, taken
        assert finalized() is None  # the frame object is gone ...
        assert writer.states[2] == shm.TAKEN and rings() == 0  # ... but a slice of its image still holds the slot
        del kept
        assert writer.states[2] == shm.FREE and rings() == 1

        # a realtime camera: a newer frame replaces the one not yet taken, whose slot goes back at once
        config = CameraConfig(source=str(VTEST))
        live = RemoteCapture(handle, 2, "live", config, parse_source(config.source))
        send(live, 0, 0, 1)
        assert writer.states[0] == shm.SENT
        send(live, 1, 1, 2)
        assert writer.states[0] == shm.FREE and writer.states[1] == shm.SENT
        taken = exchange.take(8, 0, 1, 1.0)
        assert [(f.index, int(f.image[0, 0, 0])) for f in taken.frames] == [(1, 2)]
        assert writer.states[1] == shm.SENT  # (no consumer to wait for: never TAKEN)
        del taken
        assert writer.states[1] == shm.FREE
        assert exchange.drops["live"] == 1
    finally:
        bell.close()
        shm.unlink(name)


def test_a_hung_worker_is_killed_and_replaced(tmp_path, subscriber_factory):
    """A worker that stops answering (SIGSTOP: a decoder deadlocked, the process frozen) is found out by its silence,
    killed and replaced: its camera gets camera.down `worker_died` and comes up again; the other worker's camera
    streams on without a gap."""
    cameras = camera_yaml("a", VTEST, loop=True) + camera_yaml("b", VTEST, loop=True)
    daemon = Daemon(tmp_path, cameras, workers=2, await_subscribers=1)
    try:
        subscriber = subscriber_factory(daemon.publisher, idle_s=5)
        instance = daemon.instance()
        subscriber.wait_for(lambda ms: all(len(frames_of(ms, c)) >= 10 for c in "ab"), timeout=120)
        workers = worker_pids(daemon.pid)
        assert len(workers) == 2, workers
        hung = workers[0]
        hung_camera = {"c1": "a", "c2": "b"}[mapped_segments(hung, instance).pop().rsplit("-", 1)[1].split(".")[0]]
        os.kill(hung, signal.SIGSTOP)
        died = subscriber.wait_for(lambda ms: bool(events_of(ms, "camera.down", hung_camera)), timeout=120)
        (down,) = events_of(died, "camera.down", hung_camera)
        assert down["reason"] == "worker_died" and "SIGKILL" in down["error"], down
        back = subscriber.wait_for(lambda ms: len(events_of(ms, "camera.up", hung_camera)) >= 2, timeout=60)
        mark = len(back)
        subscriber.wait_for(lambda ms: len(frames_after(ms, hung_camera, mark)) >= 10, timeout=60)
        assert not alive(hung)
        assert len(worker_pids(daemon.pid)) == 2
        assert daemon.stop() == 0, daemon.log_text()[-3000:]
        assert segments(instance) == set()
    finally:
        daemon.kill()
    messages = subscriber.finish(timeout=60)
    other = "b" if hung_camera == "a" else "a"
    assert lifecycle(messages, other) == [("camera.up", None), ("camera.down", "stopped")]
    indices = frames_of(messages, other)
    assert indices[0] == 0 and gaps(indices) == [], gaps(indices)[:5]


def test_cameras_spread_over_the_workers_and_one_stopped_while_its_worker_is_down_is_stopped_at_once(tmp_path):
    """No processes: a pool that is not started is like one whose worker died and has not been restarted yet."""
    pool = CaptureWorkers(2, 6, FrameExchange(), tmp_path)
    config = CameraConfig(source=str(VTEST))
    captures = [pool.capture(name, config, parse_source(config.source)) for name in "abcd"]
    # made before any is started (as the daemon does): two a worker
    assert sorted(c.worker for c in captures) == [0, 0, 1, 1]
    capture = captures[0]
    capture.start()
    assert capture.is_alive()
    capture.stop()  # no worker to tell: nothing runs it any more
    capture.join(0)
    assert not capture.is_alive()
    assert capture.capture_id not in pool.handles[capture.worker].captures


def test_a_doorbell_rung_again_while_ringing_does_not_hang():
    """A garbage collection inside `ring` can free a frame of the same worker, whose finalizer rings again on the
    same thread: that must not wait on itself."""
    bell = Doorbell()
    done = threading.Event()

    def ring_inside_ring() -> None:
        with bell._lock:  # as if inside ring(), when the collector runs a frame's finalizer
            bell.ring()
        done.set()

    thread = threading.Thread(target=ring_inside_ring, daemon=True)
    thread.start()
    assert done.wait(10), "ringing inside a ring hung"
    assert os.read(bell.fd, 8) == (1).to_bytes(8, "little")
    bell.close()
    bell.ring()  # after close: nothing, and no write to whatever reuses the descriptor


def test_frame_memory_a_worker_names_is_checked_before_it_is_mapped_or_unlinked(tmp_path):
    """The daemon maps and unlinks only segments of the worker that sends them, at the size the layout needs: a name
    of another worker, another daemon or a path, a file smaller than its slots, a slot past the end are refused
    (logged) and leave the files as they were."""
    shape, slots = (48, 64, 3), 4
    exchange = FrameExchange()
    pool = CaptureWorkers(2, slots, exchange, tmp_path)
    handle = pool.handles[0]
    handle.generation = 1
    other = CaptureWorkers(1, slots, FrameExchange(), tmp_path)  # another daemon's worker 0
    mine, theirs, neighbour = (
        str(shm.SegmentName(pool.instance, 0, 1, 1, 1)),
        str(shm.SegmentName(other.instance, 0, 1, 1, 1)),
        str(shm.SegmentName(pool.instance, 1, 1, 1, 1)),
    )
    made = [shm.Segment.create(name, shape, slots) for name in (mine, theirs, neighbour)]
    small = str(shm.SegmentName(pool.instance, 0, 1, 2, 1))
    made.append(shm.Segment.create(small, shape, 1))
    config = CameraConfig(source=str(VTEST), realtime=True)
    rc = RemoteCapture(handle, 1, "cam", config, parse_source(config.source))
    handle.captures[1] = rc
    bell = Doorbell()
    try:
        for name, count, slot in [(theirs, slots, 0), (neighbour, slots, 0), ("../../tmp/x", slots, 0),
                                  (small, slots, 0), (mine, slots, slots)]:  # fmt: skip
            rc.deliver(bell, name, count, shape, slot, 0, time.time(), time.monotonic(), None)
            assert exchange.waiting == 0, name
        prefix = shm.worker_prefix(pool.instance, 0, 1)
        for count, layout in [(0, shape), (shm.MAX_SLOTS + 1, shape), (slots, (48, 64, 4)), (slots, (0, 64, 3))]:
            with pytest.raises(ValueError):
                shm.Segment.attach(mine, layout, count, prefix)
        rc.deliver(bell, mine, slots, shape, 1, 0, time.time(), time.monotonic(), None)
        assert exchange.waiting == 1  # the worker's own segment, as it made it
        handle._handle(CaptureStopped(1, [theirs, neighbour, "../" + mine, mine]), bell)
        assert not (shm.SHM_DIR / mine).exists()
        assert all((shm.SHM_DIR / name).exists() for name in (theirs, neighbour))
    finally:
        for segment in made:
            shm.unlink(segment.name)
