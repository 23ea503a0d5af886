"""Replay and resumable subscriptions over real sockets: a publisher with its journal, the replay socket, and
`vigild.client.Subscriber(resume=True)`. The daemon-level cases (subscribers in other processes, a killed
subscriber, a full disk) are in test_journal_daemon.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq
from conftest import free_endpoint, journal_record

from vigild.client import GAP_TOPIC, Subscriber
from vigild.config.settings import PublisherConfig
from vigild.events import Event
from vigild.outputs.bus import EventBus
from vigild.outputs.journal import Journal, JournalWriter
from vigild.outputs.publisher import Publisher
from vigild.outputs.replay import PAGE_EVENTS, ReplayServer
from vigild.service.status import Heartbeat
from vigild.vision.snapshot import Snapshot

T0 = time.time()  # now: retention (30 days) keeps these events


class Daemonish:
    """The daemon's outputs as it wires them: the bus stamps each event and hands it to the publisher and the
    journal's writer; the replay socket reads the journal."""

    def __init__(self, tmp_path: Path, hwm: int = 1000):
        self.endpoint = free_endpoint()
        self.replay_endpoint = f"ipc://{tmp_path}/replay"
        self.publisher = Publisher(PublisherConfig(endpoint=self.endpoint, hwm=hwm, heartbeat_interval=0.2))
        self.publisher.start()
        self.writer = JournalWriter(Journal(tmp_path / "journal.db"))
        self.bus = EventBus()
        self.bus.continue_from(self.writer.through)
        self.bus.attach(self.publisher)
        self.bus.attach(self.writer)
        self.writer.start()
        self.replay = ReplayServer(self.replay_endpoint, self.writer, self.bus)
        self.replay.start()
        # the daemon's heartbeat says the last seq published: a gap at the end of the stream shows there
        beat = lambda: Event("heartbeat", "sys", time.time(), data={"publisher": {"last_seq": self.bus.last_seq}})  # noqa: E731
        self.heartbeat = Heartbeat(0.2, beat, self.bus.publish)
        self.heartbeat.start()

    def publish(self, first: int, count: int, with_jpeg: bool = False) -> None:
        for index in range(first, first + count):
            snapshot = Snapshot(f"jpeg-{index}".encode(), "crop", 10, 10) if with_jpeg else None
            self.bus.publish(Event("zone.enter", "door", T0 + index, index, data={"n": index}, snapshot=snapshot))

    def settle(self) -> None:
        deadline = time.monotonic() + 30
        while not self.writer.idle:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def subscriber(self, **kwargs) -> Subscriber:
        return Subscriber(self.endpoint, resume=True, replay_endpoint=self.replay_endpoint, **kwargs)

    def close(self) -> None:
        self.heartbeat.stop()
        self.replay.stop()
        self.publisher.stop()
        self.writer.stop()


@pytest.fixture
def outputs(tmp_path):
    made = Daemonish(tmp_path)
    yield made
    made.close()


def take(subscriber: Subscriber, count: int, timeout: float = 30) -> list:
    """The next `count` messages that are not heartbeats."""
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        message = subscriber.receive(timeout=0.5)
        if message is not None and message.event.get("type") != "heartbeat":
            got.append(message)
    return got


def test_a_late_subscriber_gets_every_event_from_the_journal_once_in_order_with_its_snapshot(outputs):
    outputs.publish(1, 700, with_jpeg=True)  # more than a page
    outputs.settle()
    with outputs.subscriber(after_seq=0) as subscriber:
        messages = take(subscriber, 700)
        assert [m.event["seq"] for m in messages] == list(range(1, 701))
        assert [m.event["n"] for m in messages] == list(range(1, 701))
        assert all(m.snapshot == f"jpeg-{m.event['n']}".encode() for m in messages)
        assert subscriber.replayed == 700 and subscriber.missed == 0
        outputs.publish(701, 5)  # then the live stream, with nothing twice
        assert [m.event["seq"] for m in take(subscriber, 5)] == list(range(701, 706))
        assert take(subscriber, 1, timeout=1.0) == []  # heartbeats at most: no event twice


def test_resuming_after_a_seq_starts_right_after_it(outputs):
    outputs.publish(1, 50)
    outputs.settle()
    with outputs.subscriber(after_seq=42) as subscriber:
        assert [m.event["seq"] for m in take(subscriber, 8)] == list(range(43, 51))


def test_events_the_live_stream_dropped_are_filled_by_replay(tmp_path):
    """A publisher high-water mark of 2 and a subscriber that does not read while 300 events go out: ZeroMQ drops
    most of them for it; the subscriber sees the gap in seq (at the next event, or the heartbeat's last seq) and
    fills it."""
    outputs = Daemonish(tmp_path, hwm=2)
    try:
        with outputs.subscriber() as subscriber:
            deadline = time.monotonic() + 30
            outputs.publish(1, 1)  # the subscription is through once an event arrives
            while not take(subscriber, 1, timeout=0.5):
                assert time.monotonic() < deadline
                outputs.publish(1, 1)
            first = subscriber.last_seq
            assert first is not None
            outputs.publish(100, 300)  # not read meanwhile: dropped at the high-water marks
            outputs.settle()
            last = outputs.bus.last_seq
            messages = take(subscriber, last - first)
            assert [m.event["seq"] for m in messages] == list(range(first + 1, last + 1))
            assert subscriber.replayed > 0 and subscriber.missed == 0
    finally:
        outputs.close()


def test_what_the_journal_lacks_comes_as_gap_notices_with_the_exact_ranges(tmp_path):
    """Rows 1-10 and 16-30 stored, 11-15 never journaled (a full disk), and retention then removed 1-4: a resuming
    subscriber gets 5-10, a gap notice for 11-15, 16-30 (and a notice for 1-4 first)."""
    journal = Journal(tmp_path / "journal.db", retention_days=30)
    run = "0" * 32
    kept = [*range(1, 11), *range(16, 31)]
    records = [journal_record({"schema": 1, "seq": seq, "id": f"{seq:032x}", "run": run, "type": "zone.enter",
                       "camera": "door", "frame": seq, "ts": "2026-11-30T10:00:00Z" if seq > 4 else
                       "2020-01-01T00:00:00Z"}) for seq in kept]  # fmt: skip
    journal.write(records)
    journal.prune()  # by age: 1-4 go
    writer = JournalWriter(journal)
    assert writer.through == 30
    endpoint, replay = free_endpoint(), f"ipc://{tmp_path}/replay"
    server = ReplayServer(replay, writer, SimpleNamespace(last_seq=30, run=run))
    server.start()
    try:
        with Subscriber(endpoint, resume=True, after_seq=0, replay_endpoint=replay) as subscriber:
            messages = take(subscriber, 2 + 6 + 15)
    finally:
        server.stop()
        journal.close()
    gaps = [(m.event["first"], m.event["last"], m.event["reason"]) for m in messages if m.topic == GAP_TOPIC]
    assert gaps == [(1, 4, "retention"), (11, 15, "not_journaled")]
    order = [m.event["seq"] if m.topic != GAP_TOPIC else ("gap", m.event["first"]) for m in messages]
    assert order == [("gap", 1), *range(5, 11), ("gap", 11), *range(16, 31)]
    assert subscriber.missed == 9


def test_a_gap_the_replay_socket_does_not_answer_for_is_a_notice_not_silence(tmp_path):
    """Events 1-20 are in a journal nobody serves; the subscriber resumes after 5 and the first live event it gets
    is 21 or later: it is told that 6 up to that one are missing, then gets it."""
    journal = Journal(tmp_path / "journal.db")
    journal.write([journal_record({"schema": 1, "seq": seq, "id": f"{seq:032x}", "run": "0" * 32, "type": "zone.enter",
                           "camera": "door", "frame": seq, "ts": "2026-11-30T10:00:00Z"}) for seq in range(1, 21)])  # fmt: skip
    writer = JournalWriter(journal)
    publisher = Publisher(PublisherConfig(endpoint=free_endpoint()))
    bus = EventBus()
    bus.continue_from(writer.through)  # seq goes on from 20
    bus.attach(publisher)
    bus.attach(writer)
    publisher.start()
    writer.start()
    try:
        with Subscriber(publisher.config.endpoint, resume=True, after_seq=5, replay_endpoint=f"ipc://{tmp_path}/nobody",
                        replay_timeout=1.0) as subscriber:  # fmt: skip
            got: list = []
            deadline = time.monotonic() + 30
            while len(got) < 2 and time.monotonic() < deadline:  # until the subscription is through
                bus.publish(Event("zone.enter", "door", T0, 0))
                message = subscriber.receive(timeout=0.05)
                if message is not None:
                    got.append(message)
            got += take(subscriber, max(0, 2 - len(got)))
    finally:
        publisher.stop()
        writer.stop()
    notice, event = got[:2]
    assert notice.topic == GAP_TOPIC and notice.event["reason"] == "no_replay"
    assert (notice.event["first"], notice.event["last"] + 1) == (6, event.event["seq"]) and event.event["seq"] >= 21
    assert subscriber.missed == event.event["seq"] - 6


def test_replay_pages_are_bounded_and_a_bad_request_gets_an_error(outputs):
    outputs.publish(1, PAGE_EVENTS + 20)
    outputs.settle()
    context = zmq.Context.instance()
    client = context.socket(zmq.DEALER)
    client.connect(outputs.replay_endpoint)
    try:
        client.send_multipart([b"", json.dumps({"after_seq": 0}).encode()])
        assert client.poll(10_000)
        _, header, *parts = client.recv_multipart()
        page = json.loads(header)
        assert page["events"] == PAGE_EVENTS == len(parts) // 2 and page["through"] == PAGE_EVENTS
        assert page["missing"] == [] and page["journaled_through"] == PAGE_EVENTS + 20
        assert [json.loads(body)["seq"] for body in parts[::2]] == list(range(1, PAGE_EVENTS + 1))
        for bad in ({"after_seq": -1}, {"after_seq": "x"}, {}, {"after_seq": 1 << 70}, [1], 7):
            client.send_multipart([b"", json.dumps(bad).encode()])
            assert client.poll(10_000)
            _, reply = client.recv_multipart()
            assert "not a replay request" in json.loads(reply)["error"]
        flood = context.socket(zmq.DEALER)  # a request far over the limit: that peer is cut off, nobody else
        flood.connect(outputs.replay_endpoint)
        flood.send_multipart([b"", b" " * (1 << 20)])
        assert not flood.poll(1000)
        flood.close(linger=0)
        client.send_multipart([b"", json.dumps({"after_seq": PAGE_EVENTS}).encode()])
        assert client.poll(10_000)
        assert json.loads(client.recv_multipart()[1])["events"] == 20
    finally:
        client.close(linger=0)
