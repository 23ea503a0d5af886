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
from conftest import VTEST
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
