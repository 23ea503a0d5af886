"""The ZeroMQ publisher over real sockets: framing, seq, non-blocking under slow or absent subscribers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq
from conftest import ROOT

from vigild.client import Subscriber
from vigild.config.loading import PublisherConfig
from vigild.events import Event
from vigild.outputs.bus import EventBus
from vigild.outputs.publisher import Publisher, is_loopback_endpoint


def event(i: int, camera: str = "door") -> Event:
    return Event("track.update", camera, 1_700_000_000.0 + i, i, {"track_id": i, "label": "person"})


def connected(subscriber: Subscriber, bus: EventBus) -> None:
    """Publish probes until one arrives, so the subscription is in place (ZeroMQ's slow-joiner)."""
    for _ in range(100):
        bus.publish(Event("probe", "sys", time.time()))
        if subscriber.receive(timeout=0.05) is not None:
            while subscriber.receive(timeout=0.05) is not None:
                pass
            return
    raise AssertionError("subscriber never connected")


def test_multipart_topic_and_json_with_consecutive_seq(endpoint):
    publisher = Publisher(PublisherConfig(endpoint=endpoint))
    bus = EventBus()
    bus.attach(publisher)
    publisher.start()
    with Subscriber(endpoint) as subscriber:
        connected(subscriber, bus)
        for i in range(20):
            bus.publish(event(i))
        received = [subscriber.receive(timeout=2) for _ in range(20)]
    publisher.stop()
    assert all(m is not None for m in received)
    assert [m.topic for m in received] == ["vigild.door.track.update"] * 20  # type: ignore[union-attr]
    seqs = [m.event["seq"] for m in received]  # type: ignore[union-attr]
    assert seqs == list(range(seqs[0], seqs[0] + 20))
    first = received[0].event  # type: ignore[union-attr]
    assert first["ts"] == "2023-11-14T22:13:20.000Z" and first["frame"] == 0 and first["object"]["track_id"] == 0
    assert subscriber.missed == 0


def test_topic_prefix_filters(endpoint):
    publisher = Publisher(PublisherConfig(endpoint=endpoint))
    bus = EventBus()
    bus.attach(publisher)
    publisher.start()
    with Subscriber(endpoint, topics=["vigild.yard."]) as subscriber:
        for _ in range(100):  # wait until the subscription is in place
            bus.publish(event(0, "yard"))
            if subscriber.receive(timeout=0.05):
                break
        while subscriber.receive(timeout=0.1):
            pass
        bus.publish(event(1, "door"))
        bus.publish(event(2, "yard"))
        message = subscriber.receive(timeout=2)
        assert message is not None and message.event["frame"] == 2
        assert subscriber.receive(timeout=0.2) is None
    publisher.stop()


def test_full_queue_drops_and_counts_and_leaves_a_visible_gap():
    publisher = Publisher(PublisherConfig(queue_size=2))  # not started: nothing drains the queue
    bus = EventBus()
    bus.attach(publisher)
    for i in range(5):
        bus.publish(event(i))
    assert publisher.stats.queued == 2 and publisher.stats.dropped_queue_full == 3
    bus.publish(event(5))
    assert bus.last_seq == 6  # seq was taken for the dropped ones too, so subscribers see the gap


def test_slow_subscriber_never_blocks_publish(endpoint):
    publisher = Publisher(PublisherConfig(endpoint=endpoint, hwm=10, queue_size=100_000))
    bus = EventBus()
    bus.attach(publisher)
    publisher.start()
    context = zmq.Context.instance()
    sluggish = context.socket(zmq.SUB)
    sluggish.setsockopt(zmq.RCVHWM, 1)
    sluggish.setsockopt(zmq.SUBSCRIBE, b"")
    sluggish.connect(endpoint)  # and never reads
    big = {"blob": "x" * 20_000}
    done = threading.Event()

    def flood() -> None:
        for i in range(20_000):
            bus.publish(Event("bulk", "door", time.time(), i, data=big))
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(60), "publish() blocked behind a subscriber that does not read"
    stopper = threading.Thread(target=publisher.stop, daemon=True)
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive(), "stop() hung on a subscriber that does not read"
    assert publisher.stats.sent + publisher.stats.dropped_unsendable == 20_000
    sluggish.close(linger=0)


def test_heartbeat_is_published_on_its_interval(endpoint):
    from vigild.service.status import Heartbeat

    beats = iter(range(1000))
    publisher = Publisher(PublisherConfig(endpoint=endpoint))
    bus = EventBus()
    bus.attach(publisher)
    publisher.start()

    def beat() -> Event:
        return Event("heartbeat", "sys", time.time(), data={"n": next(beats)})

    heartbeat = Heartbeat(0.1, beat, bus.publish)
    heartbeat.start()
    with Subscriber(endpoint, topics=["vigild.sys.heartbeat"]) as subscriber:
        got = [subscriber.receive(timeout=2) for _ in range(3)]
    heartbeat.stop()
    publisher.stop()
    assert all(m is not None and m.event["type"] == "heartbeat" for m in got)
    ns = [m.event["n"] for m in got]  # type: ignore[union-attr]
    assert ns == sorted(ns) and len(set(ns)) == 3


def test_vigild_sub_prints_json_lines(endpoint):
    publisher = Publisher(PublisherConfig(endpoint=endpoint))
    bus = EventBus()
    bus.attach(publisher)
    publisher.start()
    sub = subprocess.Popen(
        [sys.executable, "-m", "vigild", "sub", "--endpoint", endpoint, "--count", "3", "vigild.door."],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while sub.poll() is None and time.monotonic() < deadline:
            bus.publish(event(0, "yard"))  # filtered out
            bus.publish(event(1, "door"))
            time.sleep(0.05)
        out, _ = sub.communicate(timeout=10)
    finally:
        sub.kill()
        publisher.stop()
    assert sub.returncode == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["camera"] == "door" for line in lines)


def test_loopback_detection():
    assert is_loopback_endpoint("tcp://127.0.0.1:5555")
    assert is_loopback_endpoint("tcp://localhost:5555")
    assert is_loopback_endpoint("ipc:///run/vigild/events")
    assert not is_loopback_endpoint("tcp://0.0.0.0:5555")
    assert not is_loopback_endpoint("tcp://*:5555")


def test_a_snapshot_travels_as_a_third_part_to_a_plain_subscriber(endpoint, subscriber_factory, tmp_path):
    """A subscriber in another process (plain pyzmq) gets `[topic, json, jpeg]` and the JSON describes the JPEG."""
    import cv2
    import numpy as np

    from vigild.vision.snapshot import make_snapshot

    image = np.full((480, 640, 3), 60, np.uint8)
    image[100:300, 200:300] = (0, 220, 0)
    snapshot = make_snapshot(image, [200, 100, 300, 300], "crop")
    assert snapshot is not None
    publisher = Publisher(PublisherConfig(endpoint=endpoint))
    bus = EventBus()
    bus.attach(publisher)
    publisher.start()
    subscriber = subscriber_factory(endpoint, idle_s=2.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not subscriber.messages():
        bus.publish(Event("probe", "sys", time.time()))
        time.sleep(0.05)
    with_image = Event("zone.enter", "door", time.time(), 7, {"track_id": 1, "bbox": [200, 100, 300, 300]}, {"zone": "hall"})
    with_image.snapshot = snapshot
    bus.publish(with_image)
    bus.publish(event(8))  # and the next message is an ordinary two-part one
    messages = subscriber.finish()
    publisher.stop()
    (entered,) = [m for m in messages if m["event"]["type"] == "zone.enter"]
    described = entered["event"]["snapshot"]
    jpeg = Path(entered["snapshot_file"]).read_bytes()
    assert described["bytes"] == len(jpeg) and described["kind"] == "crop"
    picture = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[1::-1] == (described["width"], described["height"]) == (140, 280)
    (after,) = [m for m in messages if m["event"]["type"] == "track.update"]
    assert "snapshot_file" not in after and "snapshot" not in after["event"]


def test_a_plugins_data_never_overwrites_the_envelope(endpoint, caplog):
    """A plugin's event `data` with keys named like envelope fields (seq, id, camera...) cannot forge them: the
    subscriber sees the publisher's seq and id, the event's own camera, type and frame; the colliding keys are
    dropped (logged once per type), the others kept."""
    forged = {
        key: "forged" for key in ("schema", "seq", "id", "run", "type", "camera", "frame", "ts", "object", "snapshot")
    }
    publisher = Publisher(PublisherConfig(endpoint=endpoint))
    bus = EventBus()
    bus.attach(publisher)
    publisher.start()
    with Subscriber(endpoint) as subscriber:
        connected(subscriber, bus)
        for i in range(2):
            bus.publish(Event("zone.count", "door", 1_700_000_000.0, 7, data={**forged, "total": i}))
        received = [subscriber.receive(timeout=2) for _ in range(2)]
    publisher.stop()
    assert all(m is not None for m in received)
    events = [m.event for m in received]  # type: ignore[union-attr]
    assert events[1]["seq"] == events[0]["seq"] + 1 and subscriber.missed == 0
    for i, body in enumerate(events):
        assert body["schema"] == 1 and body["type"] == "zone.count" and body["camera"] == "door"
        assert body["frame"] == 7 and body["ts"] == "2023-11-14T22:13:20.000Z" and len(body["id"]) == 32
        assert body["run"] == bus.run
        assert "object" not in body and "snapshot" not in body and body["total"] == i
    assert "forged" not in json.dumps(events)
    warnings = [r.getMessage() for r in caplog.records if "envelope field" in r.getMessage()]
    assert len(warnings) == len(forged), warnings  # each key once, not once per event


def heartbeat(i: int) -> Event:
    return Event("heartbeat", "sys", 1_700_000_000.0 + i, data={"uptime_s": i})


def test_heartbeats_have_a_sequence_of_their_own_and_events_seq_counts_events_only(endpoint):
    publisher = Publisher(PublisherConfig(endpoint=endpoint))
    bus = EventBus()
    bus.attach(publisher)
    publisher.start()
    with Subscriber(endpoint) as subscriber:
        connected(subscriber, bus)
        for i in range(10):
            bus.publish(event(i))
            if i % 3 == 0:
                bus.publish(heartbeat(i))
        received = [subscriber.receive(timeout=2) for _ in range(14)]
    publisher.stop()
    assert all(m is not None for m in received)
    bodies = [m.event for m in received]  # type: ignore[union-attr]
    events = [b["seq"] for b in bodies if b["type"] == "track.update"]
    beats = [b["seq"] for b in bodies if b["type"] == "heartbeat"]
    assert events == list(range(events[0], events[0] + 10))  # no hole where a heartbeat went out
    assert beats == [1, 2, 3, 4]  # the heartbeats' own count
    assert subscriber.missed == 0
    assert {b["run"] for b in bodies} == {bus.run} and len({b["id"] for b in bodies}) == 14


def test_a_restarted_daemon_is_a_new_run_not_a_gap(endpoint):
    """A subscriber that stays while the daemon restarts (a new publisher on the same endpoint, seq from 1 again)
    sees a new `run` and counts nothing missed."""
    with Subscriber(endpoint) as subscriber:
        runs = []
        for _ in range(2):
            publisher = Publisher(PublisherConfig(endpoint=endpoint))
            bus = EventBus()
            bus.attach(publisher)
            publisher.start()
            connected(subscriber, bus)
            for i in range(5):
                bus.publish(event(i))
            received = [subscriber.receive(timeout=2) for _ in range(5)]
            assert all(m is not None for m in received)
            assert {m.event["run"] for m in received} == {bus.run}  # type: ignore[union-attr]
            runs.append(bus.run)
            publisher.stop()
        assert runs[0] != runs[1] and subscriber.missed == 0
