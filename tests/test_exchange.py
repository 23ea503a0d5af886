"""The latest-frame hand-over between capture threads and the scheduler."""

from __future__ import annotations

import threading
import time

import numpy as np

from vigild.capture.exchange import FrameExchange, Notice, NoticeKind
from vigild.frame import Frame

IMAGE = np.zeros((4, 4, 3), np.uint8)


def frame(camera: str, index: int) -> Frame:
    return Frame(camera, index, time.time(), time.monotonic(), IMAGE)


def test_slower_consumer_drops_the_oldest_frame_and_counts_it():
    exchange = FrameExchange()
    for i in range(5):
        exchange.put(frame("door", i))
    taken = exchange.take(max_frames=8, max_wait=0, want=1, timeout=0.1)
    assert [f.index for f in taken.frames] == [4]  # only the latest: no queue of stale frames
    assert exchange.drops["door"] == 4


def test_waiting_put_loses_nothing():
    exchange = FrameExchange()
    received: list[int] = []

    def consume() -> None:
        while len(received) < 50:
            taken = exchange.take(8, 0, 1, 0.5)
            received.extend(f.index for f in taken.frames)
            time.sleep(0.001)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for i in range(50):
        assert exchange.put(frame("file", i), wait=True)
    consumer.join(5)
    assert received == list(range(50))
    assert exchange.drops["file"] == 0


def test_batch_collects_one_frame_per_camera_oldest_first_up_to_max():
    exchange = FrameExchange()
    for camera in ["c", "a", "b"]:
        exchange.put(frame(camera, 0))
    taken = exchange.take(max_frames=2, max_wait=0, want=3, timeout=0.1)
    assert [f.camera for f in taken.frames] == ["c", "a"]
    assert [f.camera for f in exchange.take(2, 0, 1, 0.1).frames] == ["b"]


def test_batch_waits_up_to_max_wait_for_more_cameras():
    exchange = FrameExchange()
    exchange.put(frame("a", 0))
    threading.Timer(0.05, lambda: exchange.put(frame("b", 0))).start()
    taken = exchange.take(max_frames=8, max_wait=2.0, want=2, timeout=0.1)
    assert sorted(f.camera for f in taken.frames) == ["a", "b"]
    exchange.put(frame("a", 1))
    taken = exchange.take(max_frames=8, max_wait=0.05, want=2, timeout=0.1)
    assert [f.camera for f in taken.frames] == ["a"]  # no second camera came within max_wait: a batch of one


def test_down_notice_waits_until_the_cameras_last_frame_is_taken():
    exchange = FrameExchange()
    exchange.notify(Notice("a", NoticeKind.UP, time.time(), 0, {}))
    exchange.put(frame("a", 0))
    exchange.notify(Notice("a", NoticeKind.ENDED, time.time(), 0, {}))
    taken = exchange.take(8, 0, 1, 0.1)
    assert [n.kind for n in taken.opened] == [NoticeKind.UP]
    assert [f.index for f in taken.frames] == [0]
    assert [n.kind for n in taken.closed] == [NoticeKind.ENDED]


def test_close_releases_a_blocked_producer():
    exchange = FrameExchange()
    exchange.put(frame("a", 0))
    results: list[bool] = []
    producer = threading.Thread(target=lambda: results.append(exchange.put(frame("a", 1), wait=True)))
    producer.start()
    time.sleep(0.3)
    assert producer.is_alive(), "put(wait=True) should block while the slot is full"
    exchange.close()
    producer.join(2)
    assert results == [False]


def test_frame_after_a_reconnect_waits_until_the_outage_is_closed():
    exchange = FrameExchange()
    exchange.put(frame("a", 5))
    assert [f.index for f in exchange.take(8, 0, 1, 0.1).frames] == [5]
    # while the scheduler was busy: the camera went down after frame 5, came back, and captured frame 6
    exchange.notify(Notice("a", NoticeKind.DOWN, time.time(), 5, {}))
    exchange.notify(Notice("a", NoticeKind.UP, time.time(), 6, {}))
    exchange.put(frame("a", 6))
    first = exchange.take(8, 0, 1, 0.1)
    assert (first.frames, first.opened, [n.kind for n in first.closed]) == ([], [], [NoticeKind.DOWN])
    second = exchange.take(8, 0, 1, 0.1)
    assert [n.kind for n in second.opened] == [NoticeKind.UP] and [f.index for f in second.frames] == [6]


def test_cameras_added_and_removed_leave_no_state_behind():
    """Cameras come and go by the thousand (control clients adding and removing them): the exchange keeps nothing
    of a removed camera once it is forgotten, and a camera added again under the same name starts clean."""
    exchange = FrameExchange()
    for i in range(2000):
        name = f"cam{i}"
        exchange.admit(name)
        exchange.put(frame(name, 0))
        exchange.put(frame(name, 1))  # one drop
        exchange.notify(Notice(name, NoticeKind.UP, time.time(), 0, {}))
        exchange.retire(name)
        assert not exchange.put(frame(name, 2))  # retired: refused until forgotten
        exchange.forget(name)
    assert exchange._retired == set() and exchange._frames == {} and not exchange._notices
    assert exchange.drops == {}
    exchange.put(frame("cam7", 0))
    assert exchange.drops["cam7"] == 0 and [f.camera for f in exchange.take(8, 0, 1, 0.1).frames] == ["cam7"]


def test_scheduler_forgets_the_cameras_a_new_configuration_drops():
    """The scheduler's per-camera counts (frames, latency, the last frame for snapshots, down/ended) of cameras
    that are no longer configured are dropped, so that add/remove cycles never grow them."""
    from vigild.config.loading import PublisherConfig, SchedulerConfig
    from vigild.outputs.bus import EventBus
    from vigild.outputs.publisher import Publisher
    from vigild.pipeline.chain import Chain
    from vigild.pipeline.scheduler import Scheduler

    exchange = FrameExchange()
    publisher = Publisher(PublisherConfig(endpoint="inproc://unused"))  # never started: publish only queues
    bus = EventBus()
    bus.attach(publisher)
    scheduler = Scheduler(SchedulerConfig(), exchange, Chain((), "cpu", {}), bus.publish, ["a"])
    for i in range(500):
        name = f"cam{i}"
        scheduler.set_cameras(["a", name])
        scheduler._process([frame(name, 0), frame("a", i)])
        scheduler.close_camera(name, "removed")
        scheduler.set_cameras(["a"])
    per_camera = (scheduler.processed, scheduler.latest, scheduler.last_latency_s, scheduler._down, scheduler._ended)
    assert [set(state) - {"a"} for state in per_camera] == [set()] * 5
    assert scheduler.processed["a"] == 500
