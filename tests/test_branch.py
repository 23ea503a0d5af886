"""A plugin beside the chain (vigild.pipeline.branch), in-process: the chain never waits for it, it works on the
newest frame of each camera and counts what it skipped, its events describe the frames they were made on, and a
camera's closing events come after its frames, also at stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pytest

from vigild.config.loading import CameraConfig, PluginSpec
from vigild.events import Event
from vigild.frame import Frame
from vigild.pipeline.branch import Branch
from vigild.pipeline.chain import Chain, PluginStartError
from vigild.plugin import Plugin, PluginConfig

IMAGE = np.zeros((4, 4, 3), np.uint8)
CAMS = {name: CameraConfig(source=f"{name}.mp4") for name in ["a", "b"]}


class GateConfig(PluginConfig):
    type: Literal["gate"] = "gate"


class Gate(Plugin[GateConfig]):
    """A test plugin (not a fake of anything real): one `seen` event per frame, with the detections' count as they
    were when the frame reached it; blocks while `closed` is clear, like a slow model."""

    Config = GateConfig
    placements = ("chain", "thread", "process")
    open_: ClassVar[threading.Event] = threading.Event()
    entered: ClassVar[threading.Event] = threading.Event()
    threads: ClassVar[set[str]] = set()

    nice: ClassVar[list[int]] = []
    torch_threads: ClassVar[list[int]] = []

    def process(self, frames: list[Frame]) -> None:
        import torch

        Gate.threads.add(threading.current_thread().name)
        Gate.nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        Gate.torch_threads.append(torch.get_num_threads())
        Gate.entered.set()
        assert Gate.open_.wait(30)
        for frame in frames:
            frame.events.append(Event("seen", frame.camera, frame.ts_wall, frame.index, data={"n": len(frame.detections)}))

    def on_source_end(self, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        Gate.threads.add(threading.current_thread().name)
        return [Event("closing", camera, ts_wall, frame_index if frame_index >= 0 else None)]


class CountConfig(PluginConfig):
    type: Literal["count"] = "count"


class Count(Plugin[CountConfig]):
    """After the branch in the chain: counts the frames it sees."""

    Config = CountConfig
    seen: ClassVar[list[tuple[str, int]]] = []

    def process(self, frames: list[Frame]) -> None:
        Count.seen.extend((frame.camera, frame.index) for frame in frames)
        for frame in frames:
            frame.events.append(Event("counted", frame.camera, frame.ts_wall, frame.index))


def idle(branch, timeout: float = 60) -> None:
    """Wait until the branch has handled everything it was given (it is running: Gate is open). The bound is
    generous: a process branch may be starting a new child (imports) on a loaded 2-core CI machine."""
    deadline = time.monotonic() + timeout
    while (branch.pending or branch.working) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not branch.pending and not branch.working


def make_chain(published: list[Event], branch: PluginSpec | None = None) -> Chain:
    """`branch` (default: the Gate plugin as a branch thread), then `Count` in the chain, for both cameras."""
    if branch is None:
        gate = GateConfig(branch=True)
        branch = PluginSpec("gate", Gate, gate, dict.fromkeys(CAMS, gate))
    count = CountConfig()
    specs = (branch, PluginSpec("count", Count, count, dict.fromkeys(CAMS, count)))
    chain = Chain(specs, "cpu", CAMS, torch_threads=4, publish=published.append)
    chain.start()
    return chain


def batch(index: int, *cameras: str) -> list[Frame]:
    return [Frame(c, index, 1000.0 + index, time.monotonic(), IMAGE) for c in cameras]


@pytest.fixture(autouse=True)
def _reset():
    Gate.open_.clear()
    Gate.entered.clear()
    Gate.threads.clear()
    Gate.nice.clear()
    Gate.torch_threads.clear()
    Count.seen.clear()
    yield
    Gate.open_.set()


def test_the_chain_goes_on_while_a_branch_is_stuck_and_the_branch_skips_to_the_newest_frames():
    published: list[Event] = []
    chain = make_chain(published)
    first = batch(0, "a", "b")
    chain.process(first)
    assert Gate.entered.wait(10)  # the branch holds frame 0 of both cameras, stuck
    for index in range(1, 6):  # the chain runs on: every frame reaches the plugin after the branch
        passed = chain.process(batch(index, "a", "b"))
        assert [f.index for f in passed] == [index, index]
    assert len(Count.seen) == 12
    assert not any(e.type == "seen" for f in first for e in f.events)  # nothing of the branch on the chain's frames
    (branch,) = chain.branches.values()
    assert branch.pending == 2  # the newest frame of each camera waits
    assert dict(branch.skipped) == {"a": 4, "b": 4}  # frames 1..4 of each camera were replaced by a newer one
    Gate.open_.set()
    # as the scheduler does at a camera's end and at stop: closing returns no events to the chain's caller, the
    # branch publishes them itself after the camera's frames
    assert chain.source_ended("a", 2000.0, 5) == []
    assert chain.source_ended("b", 2000.0, -1) == []
    chain.stop()
    seen = [(e.camera, e.frame) for e in published if e.type == "seen"]
    assert sorted(seen) == [("a", 0), ("a", 5), ("b", 0), ("b", 5)]
    for camera, last in (("a", 5), ("b", None)):  # per camera in frame order, its closing after its last frame
        events = [(e.type, e.frame) for e in published if e.camera == camera]
        assert events == [("seen", 0), ("seen", 5), ("closing", last)], events
    assert Gate.threads == {"branch-gate"}
    # the branch runs at a lower priority than the chain (nice +10 on Linux), with half its torch threads
    assert set(Gate.nice) == {min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + 10)}
    assert set(Gate.torch_threads) == {2}


def test_a_branch_skips_nothing_when_it_keeps_up_and_its_frames_are_the_chains_as_offered():
    published: list[Event] = []
    chain = make_chain(published)
    Gate.open_.set()
    for index in range(20):
        chain.process(batch(index, "a"))
        deadline = time.monotonic() + 10
        while chain.branches and next(iter(chain.branches.values())).pending and time.monotonic() < deadline:
            time.sleep(0.001)
    chain.stop()
    (branch,) = chain.branches.values()
    assert dict(branch.skipped) == {}
    assert [e.frame for e in published if e.type == "seen"] == list(range(20))
    assert branch.frames == 20


# ----- through a running daemon


def status(service) -> dict:
    from vigild.service.control import ControlClient

    with ControlClient(service.control_endpoint, timeout=20) as client:
        reply, _ = client.request("status")
    return reply["result"]


@pytest.mark.e2e
@pytest.mark.parametrize("branch", ["true", "process"])
@pytest.mark.capture_modes
def test_a_stuck_branch_never_holds_up_the_chain_counts_what_it_skips_and_closes_at_stop(
    tmp_path, subscriber_factory, branch
):
    """A test plugin as a branch (frame_echo, installed through the entry point) blocks while a file exists, like a
    slow model: the chain's plugin goes on with every frame, the branch's skipped counter rises; released, it works
    on the newest frames again, its events carrying the indices of the frames they describe; at stop its closing
    event is published. On a thread (`branch: true`) and in a process of its own (`branch: process`: its pid in the
    status, a child of the daemon's)."""
    from conftest import VTEST
    from service import Service, camera_yaml, frames_of, free_endpoint, gaps, service_config

    hang, held = tmp_path / "hang", tmp_path / "held"
    hang.touch()
    endpoint = free_endpoint()
    plugins = (
        "  - type: frame_echo\n"
        f"  - type: frame_echo\n    id: slow\n    branch: {branch}\n    kind: branch_frame\n    closing: true\n"
        f"    hang_when: {hang}\n    held_file: {held}\n"
    )
    config = service_config(tmp_path, camera_yaml("a", VTEST, loop=True), endpoint, plugins=plugins, await_subscribers=1)
    subscriber = subscriber_factory(endpoint)
    service = Service(tmp_path, config)
    try:
        subscriber.wait_for(lambda ms: len(frames_of(ms, "a")) >= 5, timeout=120)
        deadline = time.monotonic() + 60
        while not held.exists():  # the branch holds its first batch
            assert time.monotonic() < deadline, service.log_text()[-3000:]
            time.sleep(0.1)
        stuck_at = len(frames_of(subscriber.messages(), "a"))
        subscriber.wait_for(lambda ms: len(frames_of(ms, "a")) >= stuck_at + 20, timeout=60)  # the chain goes on
        first = status(service)["plugins"]
        deadline = time.monotonic() + 60
        while (second := status(service)["plugins"])["frame_echo"]["frames"] < first["frame_echo"]["frames"] + 10:
            assert time.monotonic() < deadline, (first, second)  # the chain's plugin goes on
            time.sleep(0.2)
        # the branch: stuck on its first frame, the newest one waiting, the others skipped; the chain's plugin on
        assert second["slow"]["branch"]["skipped"] > first["slow"]["branch"]["skipped"] > 0, (first, second)
        assert second["slow"]["branch"]["pending"] == 1, second
        assert second["slow"]["frames"] == first["slow"]["frames"] == 0, (first, second)
        assert second["frame_echo"]["frames"] >= first["frame_echo"]["frames"] + 10, (first, second)
        if branch == "process":
            (pid,) = second["slow"]["branch"]["pids"]
            status_lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            assert pid != service.process.pid and f"PPid:\t{service.process.pid}" in status_lines
        else:
            assert "pids" not in second["slow"]["branch"]
        hang.unlink()
        released = subscriber.wait_for(
            lambda ms: len([m for m in ms if m["event"]["type"] == "branch_frame"]) >= 10, timeout=60
        )
        assert len([m for m in released if m["event"]["type"] == "branch_frame"]) >= 10
        code, _ = service.stop()
        assert code == 0, service.log_text()[-3000:]
    finally:
        hang.unlink(missing_ok=True)
        service.kill()
    messages = subscriber.finish(timeout=60)
    chain = frames_of(messages, "a")
    assert chain[0] == 0 and gaps(chain) == []  # the chain's plugin saw every frame, the branch stuck or not
    branch = [m["event"] for m in messages if m["event"]["type"] == "branch_frame"]
    indices = [e["frame"] for e in branch]
    assert indices == sorted(set(indices)), "the branch's events are not in frame order"
    assert set(indices) <= set(chain)  # each describes a frame that came through the chain
    assert gaps(indices), "the branch skipped nothing while it was stuck"
    kinds = [m["event"]["type"] for m in messages if m["event"]["type"] in ("branch_frame", "closing", "camera.down")]
    assert kinds[-2:] == ["closing", "camera.down"], kinds[-5:]  # its closing after its frames, before the down


def test_the_status_rates_show_each_plugins_frames_per_second_and_busy_fraction():
    from vigild.service.status import Rates

    published: list[Event] = []
    chain = make_chain(published)
    Gate.open_.set()
    rates = Rates()
    rates.update({}, {}, chain)
    for index in range(10):
        chain.process(batch(index, "a", "b"))
    rates.update({}, {}, chain)
    chain.stop()
    count_fps, count_busy = rates.by_plugin["count"]
    assert count_fps > 0 and 0 <= count_busy <= 1
    assert chain.stages[1].frames == 20  # the chain's plugin ran on every frame of both cameras


def test_a_reload_keeps_a_branch_that_did_not_change_and_stops_one_left_behind():
    """As a reload does: the new chain takes over the unchanged branch instance (its thread and counters go on,
    counting into the new chain's stage) and the instance a changed config leaves behind finishes, then stops."""
    published: list[Event] = []
    old = make_chain(published)
    Gate.open_.set()
    old.process(batch(0, "a", "b"))
    (kept,) = old.branches.values()
    idle(kept)  # frame 0 handled before the reload: nothing of it can be skipped by the frames after
    gate, count = GateConfig(branch=True), CountConfig(id="count2")
    specs = (
        PluginSpec("gate", Gate, gate, dict.fromkeys(CAMS, gate)),
        PluginSpec("count2", Count, count, dict.fromkeys(CAMS, count)),
    )
    new = Chain(specs, "cpu", CAMS, reuse=old, publish=published.append)
    new.start()
    assert new.branches == {id(plugin): kept for plugin, _ in new.stages[0].instances}
    left = old.left_behind(new)
    assert [stage.spec.id for stage, _, _ in left] == ["count"]
    new.activate()
    for stage, plugin, _ in left:
        old.stop_instance(stage, plugin)
    assert kept._thread.alive  # the branch taken over runs on
    for index in range(1, 4):
        new.process(batch(index, "a"))
        idle(kept)
    new.stop()
    assert not kept._thread.alive
    assert [e.frame for e in published if e.type == "seen" and e.camera == "a"] == [0, 1, 2, 3]
    assert new.stages[0].frames - old.stages[0].frames == 3  # counted into the new chain's stage after the swap


def _recording_branch(calls: list[tuple[str, int]], gate: threading.Event) -> Branch:
    def run(frames: list[Frame]) -> set[int]:
        assert gate.wait(30)
        calls.extend(("run", frame.index) for frame in frames)
        return set()

    def close(camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        calls.append(("close", frame_index))
        return []

    return Branch("test", run, close, lambda event: None, lambda seconds, frames: None)


def test_a_frame_between_two_closings_of_its_camera_runs_between_them():
    """The camera closes, comes back for one frame and closes again while the branch is busy: the branch runs
    them in that order (never both closings first, which would leave the frame's state open after camera.down)."""
    calls: list[tuple[str, int]] = []
    gate = threading.Event()
    branch = _recording_branch(calls, gate)
    branch.start()
    branch.offer(batch(0, "a"))
    deadline = time.monotonic() + 10
    while not branch.working and time.monotonic() < deadline:
        time.sleep(0.001)
    branch.close_camera("a", 0.0, 10, wait_s=0)
    branch.offer(batch(11, "a"))
    branch.close_camera("a", 0.0, 20, wait_s=0)
    gate.set()
    branch.stop()
    assert calls == [("run", 0), ("close", 10), ("run", 11), ("close", 20)]


def test_a_branch_that_was_late_once_is_waited_for_again_once_it_has_caught_up():
    calls: list[tuple[str, int]] = []
    gate = threading.Event()
    branch = _recording_branch(calls, gate)
    branch.start()
    branch.offer(batch(0, "a"))
    branch.close_camera("a", 0.0, 0, wait_s=0.05)  # stuck in the frame: not waited for longer
    assert branch._late
    gate.set()
    for index in range(1, 30):  # frames keep coming while it catches up, as from a live camera
        branch.offer(batch(index, "b"))
        time.sleep(0.002)
    idle(branch)
    assert not branch._late
    branch.close_camera("b", 0.0, 29)  # waited for: its closing is out when this returns
    assert calls[-1] == ("close", 29)
    branch.stop()


# ----- in a process of its own (`branch: process`)


def process_chain(published: list[Event], **settings) -> Chain:
    """The `Where` test plugin in a process of its own, then `Count` in the chain."""
    from branch_plugins import Where, WhereConfig

    where = WhereConfig(branch="process", **settings)
    return make_chain(published, PluginSpec("where", Where, where, dict.fromkeys(CAMS, where)))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def test_a_process_branch_runs_its_plugin_in_a_child_at_lower_priority_and_publishes_its_events_in_order():
    published: list[Event] = []
    chain = process_chain(published)
    (branch,) = chain.branches.values()
    pid = branch.pid
    assert pid is not None and pid != os.getpid()
    parent = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("PPid:"))
    assert int(parent.split()[1]) == os.getpid()  # the daemon's child
    for index in range(5):
        frames = batch(index, "a", "b")
        assert [f.index for f in chain.process(frames)] == [index, index]
        assert not any(e.type == "seen" for f in frames for e in f.events)  # nothing of the branch on the chain's
        idle(branch)
    assert chain.source_ended("a", 2000.0, 5) == []
    assert chain.source_ended("b", 2000.0, -1) == []
    chain.stop()
    assert branch.pid is None and not alive(pid)  # it ran the plugin's stop and exited
    seen = [e for e in published if e.type == "seen"]
    assert sorted((e.camera, e.frame) for e in seen) == [(c, i) for c in "ab" for i in range(5)]
    assert {e.data["pid"] for e in seen} == {pid}
    assert {e.data["cameras"][0] for e in seen} == {"a"} and seen[0].data["cameras"] == ["a", "b"]
    # at nice +10 (Linux), with half the chain's torch threads, as a branch thread
    assert {e.data["nice"] for e in seen} == {min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + 10)}
    assert {e.data["torch_threads"] for e in seen} == {2}
    for camera, last in (("a", 5), ("b", None)):  # per camera in frame order, its closing (from the child) last
        events = [(e.type, e.frame) for e in published if e.camera == camera]
        assert events == [*(("seen", i) for i in range(5)), ("closing", last)], events
    assert {e.data["pid"] for e in published if e.type == "closing"} == {pid}
    assert Count.seen == [(c, i) for i in range(5) for c in "ab"]


def test_a_process_branch_that_dies_costs_its_batch_and_the_next_starts_a_new_process(tmp_path):
    """Killed while it holds frame 0: that frame fails (counted), the chain goes on, the next batch starts a new
    process (the plugin's state starts afresh), and a frame the plugin names in `FrameErrors` fails alone."""
    hang, held = tmp_path / "hang", tmp_path / "held"
    hang.touch()
    published: list[Event] = []
    chain = process_chain(published, hang_when=str(hang), held_file=str(held), fail_index=7)
    (branch,) = chain.branches.values()
    first = branch.pid
    assert first is not None
    chain.process(batch(0, "a"))
    wait_for(held.exists, "the branch's process holds frame 0")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not branch.working and not branch.pending, "the branch gives frame 0 up")
    assert chain.stages[0].failures["a"] == 1
    hang.unlink()
    for index in range(1, 10):
        assert [f.index for f in chain.process(batch(index, "a"))] == [index]  # the chain's plugin goes on
        idle(branch)
    second = branch.pid
    assert second is not None and second != first and not alive(first)
    chain.stop()
    seen = [e for e in published if e.type == "seen"]
    assert [e.frame for e in seen] == [1, 2, 3, 4, 5, 6, 8, 9]  # 0 died with its process; 7 failed in the plugin
    assert [e.data["seen"] for e in seen] == list(range(1, 9)) and {e.data["pid"] for e in seen} == {second}
    assert chain.stages[0].failures["a"] == 2
    assert [e.frame for e in published if e.type == "closing"] == []  # no camera closed
    assert Count.seen == [("a", i) for i in range(10)]


def test_a_process_branch_stuck_in_its_plugin_at_stop_is_killed(tmp_path):
    hang, held = tmp_path / "hang", tmp_path / "held"
    hang.touch()
    chain = process_chain([], hang_when=str(hang), held_file=str(held))
    (branch,) = chain.branches.values()
    pid = branch.pid
    assert pid is not None
    chain.process(batch(0, "a"))
    wait_for(held.exists, "the branch's process holds frame 0")
    chain.stop()  # waits for the branch as long as for a thread, then ends its process
    assert not alive(pid)


def test_a_process_branch_whose_plugin_cannot_start_fails_the_start_with_the_plugins_error():
    from branch_plugins import Where, WhereConfig

    where = WhereConfig(branch="process", fail_start=True)
    chain = Chain((PluginSpec("where", Where, where, dict.fromkeys(CAMS, where)),), "cpu", CAMS)
    with pytest.raises(PluginStartError, match=r"plugin 'where' \(plugins.0\) failed to start: RuntimeError: the "
                       "model file is not there"):  # fmt: skip
        chain.start()
