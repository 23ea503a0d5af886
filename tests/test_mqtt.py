"""The MQTT output (vigild.outputs.mqtt, docs/mqtt.md) against Debian's mosquitto, started by the tests on free
loopback ports with configs, password files and CAs they make; subscribers are processes of their own."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import VTEST, PlainSubscriber
from mqtt_broker import Broker, Subscriber
from service import Service, camera_yaml, service_config

pytestmark = pytest.mark.timeout(600)


def daemon_config(tmp_path: Path, output: str, cameras: str | None = None, plugins: str = "  - type: frame_echo\n"):
    journal = tmp_path / "journal.db"
    extra = f"journal:\n  path: {journal}\n  replay_endpoint: ipc://{tmp_path}/replay\noutputs:\n{output}"
    cameras = cameras or camera_yaml("door", VTEST, loop=True)
    return service_config(tmp_path, cameras, f"ipc://{tmp_path}/pub", plugins=plugins, extra=extra)


def mqtt_entry(broker: Broker, **keys: object) -> str:
    lines = ["  - type: mqtt", f"    url: {keys.pop('url', broker.url)}", "    daemon_id: testd"]
    lines += [f"    {key}: {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def status(service: Service) -> dict:
    out = subprocess.run([sys.executable, "-m", "vigild", "ctl", "--endpoint", service.control_endpoint, "status"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    return json.loads(out.stdout)


def wait(condition, what: str, service: Service | None = None, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        alive = service is None or service.process.poll() is None
        if not alive or time.monotonic() > deadline:
            log = service.log_text()[-3000:] if service is not None else ""
            raise AssertionError(f"never: {what}\n{log}")
        time.sleep(0.2)


def journal_bodies(tmp_path: Path) -> dict[int, str]:
    db = sqlite3.connect(f"file:{tmp_path / 'journal.db'}?mode=ro", uri=True)
    return dict(db.execute("SELECT seq, body FROM events").fetchall())


def events_of(messages: list[dict], prefix: str = "vigild") -> list[dict]:
    """The events (not state, availability or heartbeats) a subscriber got, parsed, in arrival order."""
    return [
        json.loads(m["payload"]) for m in messages
        if m["topic"].startswith(prefix + "/") and "/state/" not in m["topic"] and not m["topic"].startswith(f"{prefix}/sys/")
    ]  # fmt: skip


def test_events_arrive_on_their_topics_with_the_wire_json_and_availability_and_heartbeats_too(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker, tmp_path / "got.jsonl", "vigild/#", "watcher")
    config = daemon_config(tmp_path, mqtt_entry(broker))
    service = Service(tmp_path, config)
    try:
        wait(lambda: len(events_of(sub.messages())) >= 30, "30 events over MQTT", service)
        wait(lambda: any(m["topic"] == "vigild/sys/testd/heartbeat" for m in sub.messages()), "a heartbeat", service)
        running = status(service)["outputs"]["mqtt"]
        assert running["state"] == "running" and running["connected"] and running["connection_error"] is None
    finally:
        code, _ = service.stop()
        sub.stop()
        broker.stop()
    assert code == 0, service.log_text()[-3000:]
    messages = sub.messages()
    stored = journal_bodies(tmp_path)
    events = [m for m in messages if "/state/" not in m["topic"] and not m["topic"].startswith("vigild/sys/")]
    for message in events:
        body = json.loads(message["payload"])
        assert message["topic"] == f"vigild/{body['camera']}/{body['type']}"
        assert message["payload"] == stored[body["seq"]]  # the wire JSON, byte for byte as the journal keeps it
    assert {m["topic"] for m in events} >= {"vigild/door/frame", "vigild/door/camera.up"}
    available = [m["payload"] for m in messages if m["topic"] == "vigild/sys/testd/available"]
    assert available[0] == "online" and available[-1] == "offline"
    assert next(m["payload"] for m in messages if m["topic"] == "vigild/door/state/camera") == "streaming"
    beat = json.loads(next(m["payload"] for m in messages if m["topic"] == "vigild/sys/testd/heartbeat"))
    assert beat["type"] == "heartbeat" and beat["outputs"]["mqtt"]["type"] == "MqttOutput"


def unique_in_order(events: list[dict]) -> list[dict]:
    """Each event once, at its first arrival (QoS 1 is at least once: a consumer drops duplicates by `id`)."""
    seen: set[str] = set()
    return [e for e in events if not (e["id"] in seen or seen.add(e["id"]))]  # type: ignore[func-returns-value]


@pytest.mark.e2e
def test_broker_restarted_10_times_and_away_60_s_and_a_daemon_stopped_meanwhile_lose_no_event(tmp_path):
    """A daemon (one event per frame, ~10/s) under a broker stopped and started 10 times, then away for 60 s, then
    stopped while the daemon is stopped too (the daemon started again after the broker is back): a subscriber with a
    persistent session ends with every event the journal holds from its first on, each once after dropping
    duplicates by id, in order; the ZeroMQ subscriber saw no gap meanwhile; availability goes offline with the
    Last Will when the daemon is killed, and online again."""
    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker, tmp_path / "got.jsonl", "vigild/#", "watcher")
    config = daemon_config(tmp_path, mqtt_entry(broker))
    service = Service(tmp_path, config)
    zmq_sub = PlainSubscriber(f"ipc://{tmp_path}/pub", tmp_path / "zmq.jsonl", idle_s=600)

    def mqtt_seqs() -> list[int]:
        return [e["seq"] for e in events_of(sub.messages())]

    def journal_last() -> int:
        return max(journal_bodies(tmp_path), default=0)

    def caught_up(what: str) -> None:
        target = journal_last()
        wait(lambda: max(mqtt_seqs(), default=0) > target + 5, what, service, timeout=180)

    try:
        wait(lambda: len(mqtt_seqs()) >= 20, "20 events over MQTT", service)
        for restart in range(10):
            broker.stop()
            time.sleep(1 + restart % 3)
            broker.start()
            caught_up(f"live again after broker restart {restart + 1}")
        broker.stop()
        time.sleep(60)
        disconnected = status(service)["outputs"]["mqtt"]
        broker.start()
        caught_up("live again after 60 s away")
        zmq_events = [m["event"] for m in zmq_sub.messages() if m["event"]["type"] != "heartbeat"]
        broker.stop()
        code, _ = service.stop()
        assert code == 0, service.log_text()[-3000:]
        stopped_at = journal_last()
        broker.start()
        (tmp_path / "second").mkdir()
        service = Service(tmp_path / "second", config)  # the same config and journal: its cursor says where it was
        wait(lambda: max(mqtt_seqs(), default=0) > stopped_at + 20, "the second run's events", service)
        caught_up("the second run live")
        service.process.kill()  # no clean disconnect: the broker sends the Last Will
        service.process.wait()
        wait(lambda: [m["payload"] for m in sub.messages() if m["topic"] == "vigild/sys/testd/available"][-1:]
             == ["offline"], "the Last Will")  # fmt: skip
    finally:
        service.kill()
        zmq_sub.kill()
        sub.stop()
        broker.stop()
    assert disconnected["state"] == "disconnected" and disconnected["connected"] is False
    assert disconnected["connection_error"], disconnected
    assert (disconnected["lag_events"] > 100 and disconnected["lag_s"] > 0) or disconnected["unacked"] > 0, disconnected
    stored = journal_bodies(tmp_path)
    events = unique_in_order(events_of(sub.messages()))
    seqs = [e["seq"] for e in events]
    first = seqs[0]
    delivered_through = max(seqs)
    assert seqs == list(range(first, delivered_through + 1)), "every event once, in order"
    assert [json.dumps(e, separators=(",", ":")) for e in events] == [stored[s] for s in seqs]
    assert delivered_through > stopped_at and len({e["run"] for e in events}) == 2
    zmq_seqs = [e["seq"] for e in zmq_events]
    assert zmq_seqs == list(range(zmq_seqs[0], zmq_seqs[-1] + 1)), "the ZeroMQ subscriber saw no gap"
    assert {e["id"] for e in zmq_events if e["seq"] >= first} <= {e["id"] for e in events}
    available = [m["payload"] for m in sub.messages() if m["topic"] == "vigild/sys/testd/available"]
    assert available[-3:] == ["offline", "online", "offline"] or available[-2:] == ["online", "offline"]
    assert "offline" in available[:-1] and available.count("online") >= 2
