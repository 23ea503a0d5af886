"""The scheduler on its own, with no daemon around it (issue 16): it learns about cameras from the exchange's
notices, keeps what it measures for others to read, and tells that every camera has ended by setting the event it
was given. Real parts: an exchange, a chain with a test plugin, a publisher that is never started (it only queues)."""

from __future__ import annotations

import threading
import time
from typing import Literal

import numpy as np

from vigild.capture.exchange import FrameExchange, Notice, NoticeKind
from vigild.config.loading import CameraConfig, PluginSpec, PublisherConfig, SchedulerConfig
from vigild.frame import Frame
from vigild.outputs.bus import EventBus
from vigild.outputs.publisher import Publisher
from vigild.pipeline.chain import Chain
from vigild.pipeline.scheduler import Scheduler
from vigild.plugin import Plugin, PluginConfig

IMAGE = np.zeros((4, 4, 3), np.uint8)
CAMS = {name: CameraConfig(source=f"{name}.mp4") for name in ["a", "b"]}


class RecordConfig(PluginConfig):
    type: Literal["record"] = "record"


class RecordPlugin(Plugin[RecordConfig]):
    """A test plugin: notes the frames of each batch it is given."""

    Config = RecordConfig

    def start(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def process(self, frames: list[Frame]) -> None:
        self.seen.extend((frame.camera, frame.index) for frame in frames)


def queued_events(publisher: Publisher) -> list[tuple[str, str, object]]:
    """What the scheduler published, in order (the publisher was never started: its queue holds all of it)."""
    events = []
    while publisher._queue:
        event = publisher._queue.popleft().event  # as the bus stamped it
        events.append((event.type, event.camera, event.data.get("reason")))
    return events


def test_a_scheduler_with_no_daemon_runs_two_files_to_their_end_and_sets_the_event_it_was_given():
    exchange = FrameExchange()
    publisher = Publisher(PublisherConfig(endpoint="inproc://unused"))
    config = RecordConfig()
    chain = Chain((PluginSpec("record", RecordPlugin, config, dict.fromkeys(CAMS, config)),), "cpu", CAMS)
    chain.start()
    ended = threading.Event()
    bus = EventBus()
    bus.attach(publisher)
    scheduler = Scheduler(SchedulerConfig(), exchange, chain, bus.publish, list(CAMS), ended)
    for name in CAMS:  # each capture says `up` before its first frame
        exchange.notify(Notice(name, NoticeKind.UP, time.time(), 0, {}))
    assert exchange.streaming() == 2

    def capture(name: str) -> None:  # a file read as fast as the chain takes it (realtime: false), then its end
        for index in range(3):
            assert exchange.put(Frame(name, index, time.time(), time.monotonic(), IMAGE), wait=True)
        exchange.notify(Notice(name, NoticeKind.ENDED, time.time(), 2, {"reason": "end_of_stream"}))

    captures = [threading.Thread(target=capture, args=(name,)) for name in CAMS]
    for thread in captures:
        thread.start()
    scheduler.start()
    assert ended.wait(60), "the scheduler did not tell that every camera has ended"
    scheduler.stop(10)
    for thread in captures:
        thread.join(10)
    assert not scheduler.is_alive() and exchange.streaming() == 0

    ((plugin, _),) = chain.stages[0].instances
    assert sorted(plugin.seen) == [(name, index) for name in "ab" for index in range(3)]
    assert dict(scheduler.processed) == {"a": 3, "b": 3}
    # what it measured, for the metrics to read: one latency per frame, one plugin time per batch
    assert scheduler.latency.read().cumulative[-1] == 6
    assert chain.stages[0].durations.read().cumulative[-1] == scheduler.batches
    events = queued_events(publisher)
    assert [e for e in events if e[0] == "camera.up"] == [("camera.up", "a", None), ("camera.up", "b", None)]
    downs = sorted(e for e in events if e[0] == "camera.down")
    assert downs == [("camera.down", "a", "end_of_stream"), ("camera.down", "b", "end_of_stream")]


def test_the_exchange_counts_the_cameras_that_stream_from_their_notices():
    """The batch size the scheduler waits for: cameras that said `up`, less those down, ended or stopped on purpose."""
    exchange = FrameExchange()
    for name in "abcd":
        exchange.notify(Notice(name, NoticeKind.UP, time.time(), 0, {}))
    exchange.notify(Notice("a", NoticeKind.DOWN, time.time(), 5, {"reason": "stalled"}))
    exchange.notify(Notice("b", NoticeKind.ENDED, time.time(), 5, {"reason": "end_of_stream"}))
    exchange.retire("c")  # paused, removed or restarted: its capture is being stopped
    exchange.notify(Notice("c", NoticeKind.UP, time.time(), 6, {}))  # a late notice of the stopped capture
    assert exchange.streaming() == 1
    exchange.notify(Notice("a", NoticeKind.UP, time.time(), 6, {}))  # reconnected
    exchange.admit("c")
    exchange.notify(Notice("c", NoticeKind.UP, time.time(), 0, {}))  # its new capture
    assert exchange.streaming() == 3
    exchange.forget("d")
    assert exchange.streaming() == 2
