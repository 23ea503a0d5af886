"""What already held when the control socket was attacked (issue 15), kept so: names that cannot break a topic,
JSON that is always standard, and a bad event that is dropped without taking the publisher down."""

from __future__ import annotations

import json
import math
import time

import pytest
import zmq

from vigild.config.loading import ConfigError, PublisherConfig, load_config
from vigild.events import Event
from vigild.outputs.bus import EventBus
from vigild.outputs.publisher import Publisher

BAD_NAMES = ["a.b", "a*", "a b", "door>", "a/b", "caméra", "a#", "", "a\u200bb"]
"""Each would split a topic (`vigild.<camera>.<type>`), match another's prefix or pass for another name."""


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
@pytest.mark.parametrize("where", ["camera", "plugin id", "zone"])
def test_names_that_reach_topics_are_letters_digits_dash_and_underscore(tmp_path, name, where):
    camera, plugin_id, zone = "door", "counter", "gate"
    if where == "camera":
        camera = name
    elif where == "plugin id":
        plugin_id = name
    else:
        zone = name
    text = (
        f"cameras:\n  {json.dumps(camera)}:\n    source: test://balls\n"
        f"    zones:\n      {json.dumps(zone)}:\n        points: [[0, 0], [10, 0], [10, 10]]\n"
        f"plugins:\n  - type: analytics\n    id: {json.dumps(plugin_id)}\n"
    )
    path = tmp_path / "vigild.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    line = {"camera": 2, "zone": 5, "plugin id": 9}[where]
    assert message.startswith(f"{path}:{line}: "), message


def test_the_same_config_with_good_names_is_valid(tmp_path):
    """The counterpart of the test above: only the names made it fail."""
    path = tmp_path / "vigild.yaml"
    path.write_text(
        "cameras:\n  door-1_A:\n    source: test://balls\n"
        "    zones:\n      gate_2:\n        points: [[0, 0], [10, 0], [10, 10]]\n"
        "plugins:\n  - type: detector\n    weights: yolov8n.pt\n  - type: bytetrack\n  - type: analytics\n    id: counter-3\n"
    )
    config = load_config(path)
    assert list(config.cameras) == ["door-1_A"] and config.chain[-1].id == "counter-3"


def test_an_event_with_nan_or_infinity_is_dropped_and_counted_and_the_next_one_goes(endpoint):
    publisher = Publisher(PublisherConfig(endpoint=endpoint))
    bus = EventBus()
    bus.attach(publisher)
    publisher.start()
    context = zmq.Context.instance()
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"vigild.door.")
    subscriber.connect(endpoint)
    try:
        for _ in range(200):  # until the subscription is in place (ZeroMQ's slow joiner)
            bus.publish(Event("probe", "door", time.time()))
            if subscriber.poll(50):
                break
        else:
            raise AssertionError("subscriber never connected")
        while subscriber.poll(200):
            subscriber.recv_multipart()
        before = publisher.stats.dropped_unsendable
        bus.publish(Event("bad", "door", time.time(), data={"score": math.nan}))
        bus.publish(Event("bad", "door", time.time(), data={"score": [1.0, math.inf]}))
        bus.publish(Event("good", "door", time.time(), data={"score": 0.5}))
        received = []
        while subscriber.poll(2000):
            received.append(subscriber.recv_multipart())
            if received[-1][0] == b"vigild.door.good":
                break
        topics = [parts[0] for parts in received]
        assert topics == [b"vigild.door.good"]
        assert json.loads(received[-1][1])["score"] == 0.5  # strict JSON: any parser reads it
        assert publisher.stats.dropped_unsendable == before + 2
    finally:
        subscriber.close(linger=0)
        publisher.stop()
