"""The MQTT output (vigild.outputs.mqtt, docs/mqtt.md) against Debian's mosquitto, started by the tests on free
loopback ports with configs, password files and CAs they make; subscribers are processes of their own."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import VTEST, PlainSubscriber
from mqtt_broker import Broker, Subscriber, free_port, make_ca
from service import Service, camera_yaml, service_config

pytestmark = pytest.mark.timeout(600)


def daemon_config(tmp_path: Path, output: str, cameras: str | None = None, plugins: str = "  - type: frame_echo\n",
                  extra: str = ""):
    journal = tmp_path / "journal.db"
    extra += f"journal:\n  path: {journal}\n  replay_endpoint: ipc://{tmp_path}/replay\noutputs:\n{output}"
    cameras = cameras or camera_yaml("door", VTEST, loop=True)
    return service_config(tmp_path, cameras, f"ipc://{tmp_path}/pub", plugins=plugins, extra=extra)


def mqtt_entry(broker: Broker, **keys: object) -> str:
    lines = ["  - type: mqtt", f"    url: {keys.pop('url', broker.url)}", "    daemon_id: testd"]
    lines += [f"    {key}: {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def status(service: Service) -> dict:
    out = subprocess.run([sys.executable, "-m", "vigild", "ctl", "--endpoint", service.control_endpoint, "status"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
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
    """The daemon's journal: seq → wire JSON ({} before it exists)."""
    try:
        db = sqlite3.connect(f"file:{tmp_path / 'journal.db'}?mode=ro", uri=True)
        return dict(db.execute("SELECT seq, body FROM events").fetchall())
    except sqlite3.Error:
        return {}


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
        service_log = service.log_text()
        broker.start()
        (tmp_path / "second").mkdir(mode=0o700)
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
    # the broker unreachable: said in the status and the log, the events waiting in the journal
    assert disconnected["connection_error"] == f"cannot connect to 127.0.0.1:{broker.port}: Connection refused"
    assert "output mqtt: cannot connect to 127.0.0.1:" in service_log and "the events wait in the journal" in service_log
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


def check_output(config: Path, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`vigild check`, with the test plugin installed."""
    from conftest import daemon_env
    from service import plugin_site

    env = daemon_env(PYTHONPATH=str(plugin_site(config.parent / "check")), **(environ or {}))
    return subprocess.run([sys.executable, "-m", "vigild", "check", "--config", str(config)], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip


@pytest.mark.e2e
def test_a_wrong_password_is_a_clear_error_the_daemon_and_its_other_outputs_go_on_and_fixing_it_delivers_the_backlog(
    tmp_path,
):
    """MQTT 5 this time. The broker refuses the wrong password: the status and the log say so (the password itself
    shown nowhere, nor in `vigild check`), the ZeroMQ publisher and a file output go on; a reload with the right
    password (from ${MQTT_PASSWORD}) delivers every event from the daemon's first on, in order."""
    secret, right = "wrong-secret-123", "right-horse-battery"
    broker = Broker(tmp_path / "broker", users={"vigild": right, "watcher": "watch"}).start()
    sub = Subscriber(broker, tmp_path / "got.jsonl", "vigild/#", "watcher", username="watcher", password="watch")
    events_file = tmp_path / "events.jsonl"
    file_entry = f"  - type: file\n    path: {events_file}\n"
    wrong = mqtt_entry(broker, username="vigild", password=secret, protocol="5")
    metrics_port = free_port()
    config = daemon_config(tmp_path, wrong + file_entry, extra=f"metrics:\n  enabled: true\n  port: {metrics_port}\n")
    checked = check_output(config)
    assert checked.returncode == 0, checked.stderr
    assert f"output mqtt: mqtt mqtt://127.0.0.1:{broker.port} as vigild with a password (MQTT 5" in checked.stdout
    assert "output file: file" in checked.stdout and secret not in checked.stdout + checked.stderr
    service = Service(tmp_path, config, environ={"MQTT_PASSWORD": right})
    try:
        refused = wait(lambda: (s := status(service)["outputs"])["mqtt"]["connection_error"] and s, "an error", service)
        mqtt = refused["mqtt"]
        assert mqtt["state"] == "disconnected" and not mqtt["connected"]
        assert "the broker refused the connection" in mqtt["connection_error"], mqtt
        assert "Bad user name or password" in mqtt["connection_error"] or "Not authorized" in mqtt["connection_error"]
        lines = lambda: len(events_file.read_text().splitlines()) if events_file.exists() else 0  # noqa: E731
        before, sent = lines(), refused["publisher"]["delivered"]
        wait(lambda: lines() > before + 30 and status(service)["outputs"]["publisher"]["delivered"] > sent + 30,
             "the file output and the publisher go on", service)  # fmt: skip
        assert events_of(sub.messages()) == []
        down = scrape(metrics_port)
        applied = service.log_text().count("configuration applied")
        config.write_text(config.read_text().replace(json.dumps(secret), json.dumps("${MQTT_PASSWORD}")))
        service.signal(signal.SIGHUP)
        wait(lambda: service.log_text().count("configuration applied") > applied, "the reload", service)
        target = max(journal_bodies(tmp_path))
        wait(lambda: max((e["seq"] for e in events_of(sub.messages())), default=0) > target, "the backlog", service)
        fixed = status(service)["outputs"]["mqtt"]
        up = scrape(metrics_port)
    finally:
        code, _ = service.stop()
        sub.stop()
        broker.stop()
    assert code == 0
    assert fixed["connected"] and fixed["connection_error"] is None and fixed["from_journal"] > 30, fixed
    seqs = [e["seq"] for e in unique_in_order(events_of(sub.messages()))]
    assert seqs[0] == 1 and seqs == list(range(1, seqs[-1] + 1))  # from the daemon's first event, none lost
    log = service.log_text()
    assert "refused the connection" in log and secret not in log and right not in log
    assert secret not in json.dumps(refused) and right not in json.dumps(fixed)
    assert down['vigild_output_connected{output="mqtt"}'] == 0 and up['vigild_output_connected{output="mqtt"}'] == 1
    assert down['vigild_output_state{output="mqtt",state="disconnected"}'] == 1
    assert up['vigild_output_state{output="mqtt",state="running"}'] == 1
    assert down['vigild_output_lag_events{output="mqtt"}'] > 30 and down['vigild_output_lag_seconds{output="mqtt"}'] > 0
    assert down['vigild_output_state{output="file",state="running"}'] == 1
    assert 'vigild_output_connected{output="file"}' not in down


def scrape(port: int) -> dict[str, float]:
    """The daemon's /metrics, sample by sample."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line and line[0] != "#"}


@pytest.mark.e2e
def test_tls_with_a_client_certificate_works_an_untrusted_broker_certificate_and_a_refused_client_id_are_clear_errors(
    tmp_path,
):
    """One daemon, three MQTT outputs to a broker that requires TLS and client certificates and takes only client
    ids starting `allowed-`: the one with the right CA and an allowed id delivers; the one whose CA did not sign the
    broker's certificate says so; the one with the default client id says the broker refused it. The daemon runs on."""
    ca, other = make_ca(tmp_path / "pki"), make_ca(tmp_path / "pki", "other")
    broker = Broker(tmp_path / "broker", tls=ca, extra=("require_certificate true",
                                                        "clientid_prefixes allowed-")).start()  # fmt: skip
    url = f"mqtts://127.0.0.1:{broker.port}"
    tls = {"ca": str(ca["ca"]), "cert": str(ca["cert"]), "key": str(ca["key"])}
    outputs = (mqtt_entry(broker, url=url, id="good", tls=tls, client_id="allowed-good")
               + mqtt_entry(broker, url=url, id="untrusted", tls={**tls, "ca": str(other["ca"])}, client_id="allowed-x")
               + mqtt_entry(broker, url=url, id="refused", tls=tls))  # fmt: skip
    service = Service(tmp_path, daemon_config(tmp_path, outputs))
    try:
        outs = wait(lambda: (o := status(service)["outputs"])["good"]["delivered"] > 20
                    and o["untrusted"]["connection_error"] and o["refused"]["connection_error"] and o,
                    "one delivering, two errors", service)  # fmt: skip
        assert status(service)["cameras"]["door"]["state"] == "streaming"
    finally:
        code, _ = service.stop()
        broker.stop()
    assert code == 0
    assert outs["good"]["connected"] and outs["good"]["connection_error"] is None and outs["good"]["connects"] == 1
    assert outs["untrusted"]["connection_error"].startswith("the broker's certificate is not trusted: "), outs
    # MQTT says "identifier rejected"; mosquitto 2.0 answers a client id outside `clientid_prefixes` "not authorized"
    assert outs["refused"]["connection_error"] in ("the broker refused the connection: Client identifier not valid",
                                                   "the broker refused the connection: Not authorized"), outs  # fmt: skip
    assert outs["refused"]["client_id"] == "vigild-testd-refused"
    log = service.log_text()
    assert "output untrusted: the broker's certificate is not trusted" in log
    assert "output refused: the broker refused the connection: " in log


@pytest.mark.e2e
def test_two_daemons_on_one_broker_each_have_their_own_client_id_and_availability_and_never_kick_each_other(tmp_path):
    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker, tmp_path / "got.jsonl", "vigild/sys/+/available", "watcher", clean=True)
    services = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir(mode=0o700)
        entry = f"  - type: mqtt\n    url: {broker.url}\n"
        services.append(Service(tmp_path / name, daemon_config(tmp_path / name, entry)))
    try:
        for service in services:
            wait(lambda: status(service)["outputs"]["mqtt"]["delivered"] > 50, "50 events delivered", service)  # noqa: B023
        first = [status(service)["outputs"]["mqtt"] for service in services]
        time.sleep(3)
        then = [status(service)["outputs"]["mqtt"] for service in services]
    finally:
        for service in services:
            service.stop()
        sub.stop()
        broker.stop()
    ids = {o["client_id"] for o in then}
    assert len(ids) == 2 and all(i.startswith("vigild-") and i.endswith("-mqtt") for i in ids), ids
    assert all(o["connects"] == 1 and o["connected"] for o in first + then)  # nobody was kicked off and came back
    onlines = {m["topic"] for m in sub.messages() if m["payload"] == "online"}
    assert len(onlines) == 2 and all(t.startswith("vigild/sys/") and t.endswith("/available") for t in onlines)


def test_a_topic_prefix_with_a_wildcard_or_nul_and_bad_urls_are_config_errors_with_their_line(tmp_path):
    from vigild.config.loading import ConfigError, load_config

    base = f"cameras:\n  door:\n    source: {VTEST}\noutputs:\n  - type: mqtt\n"
    for lines, expected in [
        ('    url: mqtt://127.0.0.1\n    topic_prefix: "cams/+"\n', ":7: outputs.0.topic_prefix: the topic prefix must be non-empty without `+`, `#` or NUL"),
        ('    url: mqtt://127.0.0.1\n    topic_prefix: "cams/#"\n', ":7: outputs.0.topic_prefix: the topic prefix must be"),
        ('    url: mqtt://127.0.0.1\n    topic_prefix: "cams\\0x"\n', ":7: outputs.0.topic_prefix: the topic prefix must be"),
        ('    url: mqtt://127.0.0.1\n    topic_prefix: "cams//x"\n', ":7: outputs.0.topic_prefix: the topic prefix has an empty level"),
        ('    url: mqtt://127.0.0.1\n    discovery_prefix: "#"\n', ":7: outputs.0.discovery_prefix: the discovery prefix must be"),
        ("    url: http://127.0.0.1\n", ":6: outputs.0.url: expected mqtt://host[:port] or mqtts://host[:port]"),
        ("    url: mqtt://user:pw@127.0.0.1\n", ":6: outputs.0.url: give the credentials as `username` and `password`"),
        ("    url: mqtt://127.0.0.1:99999\n", ":6: outputs.0.url: the port is not a number from 1 to 65535"),
        ("    url: mqtt://127.0.0.1\n    tls:\n      cert: /a.pem\n", ":7: outputs.0.tls: `cert` and `key` go together"),
        ("    url: mqtt://127.0.0.1\n    qos_events: 3\n", ":7: outputs.0.qos_events: "),
    ]:  # fmt: skip
        config = tmp_path / "vigild.yaml"
        config.write_text(base + lines)
        with pytest.raises(ConfigError) as caught:
            load_config(config)
        assert f"{config}{expected}" in str(caught.value), str(caught.value)
        assert "pw@" not in str(caught.value)


def test_the_discovery_fixture_refuses_what_home_assistant_would():
    from ha_discovery_schema import problems

    good = {"unique_id": "a_b", "device": {"identifiers": ["a"]}, "state_topic": "vigild/door/state/camera",
            "availability": [{"topic": "vigild/sys/x/available"}], "availability_mode": "all"}  # fmt: skip
    assert problems("homeassistant/sensor/node/obj/config", good) == []
    assert problems("homeassistant/sensor/node/obj/config", {**good, "colour": "red"})
    assert problems("homeassistant/sensor/node/obj/config", {k: v for k, v in good.items() if k != "state_topic"})
    assert problems("homeassistant/sensor/node/obj/config", {k: v for k, v in good.items() if k != "unique_id"})
    assert problems("homeassistant/sensor/node/obj/config", {**good, "state_topic": "vigild/+/state"})
    assert problems("homeassistant/sensor/no de/obj/config", good)
    assert problems("homeassistant/image/node/obj/config", {"unique_id": "x"})
    assert problems("homeassistant/sensor/node/obj/config", {**good, "availability": [{"payload_available": "on"}]})


def test_an_event_without_the_fields_of_its_type_leaves_the_state_as_it_was():
    """Events from other producers (a plugin of one's own, an older journal) may lack a field: the state skips them,
    counts them, and goes on with the next."""
    from vigild.outputs.mqtt_state import StateTopics, Topics

    state = StateTopics(Topics("vigild", "d"), snapshots=True)
    head = {"run": "r1", "ts": "2026-12-06T10:00:00.000Z"}
    assert state.update("gate", "line.cross", json.dumps({**head, "direction": "in"}).encode()) == []
    assert state.update("gate", "zone.count", json.dumps({**head, "zone": "z", "counts": [1]}).encode()) == []
    assert state.update("gate", "track.new", json.dumps({**head, "object": {"label": "car"}}).encode()) == []
    assert state.malformed == 3 and state.cameras == {}
    got = dict(state.update("gate", "line.cross", json.dumps({**head, "line": "entry", "direction": "in"}).encode()))
    assert got["vigild/gate/state/lines/entry/in"] == b"1" and got["vigild/gate/state/lines/entry/out"] == b"0"


def latest(messages: list[dict]) -> dict[str, object]:
    """Each topic's last payload, as a retained-state reader ends up seeing it."""
    return {m["topic"]: m["payload"] for m in messages}


@pytest.mark.e2e
def test_on_the_plaza_the_retained_state_agrees_with_the_analytics_and_discovery_validates_and_a_reload_clears(tmp_path):
    """The plaza footage through Yolo-Fastest, ByteTrack and the analytics (zone `path`, line `crossing`, crop
    snapshots), with Home Assistant discovery and commands on; an idle second camera keeps the daemon running once
    the file ends. After the file ends the retained state agrees with the journal's analytics events (the last
    occupancy per zone, crossings counted per direction, the most objects in view at once from track.new/track.end,
    the camera `ended`); every discovery config validates against the 2024.12 fixture; the camera's switch pauses
    and resumes the idle camera; a reload that removes the zone clears its retained state and its entities."""
    import paho.mqtt.publish as publish
    from conftest import yolo_fastest_yaml
    from ha_discovery_schema import problems

    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker, tmp_path / "got.jsonl", "#", "watcher")
    zone = "    zones:\n      path: {points: [[0, 180], [768, 120], [768, 420], [0, 420]]}\n"
    cameras = (f"  plaza:\n    source: {VTEST}\n    realtime: false\n{zone}"
               "    lines:\n      crossing: {points: [[250, 120], [250, 576]]}\n"
               "  idle:\n    source: test://\n    fps: 2\n")  # fmt: skip
    plugins = f"{yolo_fastest_yaml(0.3)}\n  - type: bytetrack\n  - type: analytics\n    snapshot: crop\n"
    config = daemon_config(tmp_path, mqtt_entry(broker, homeassistant=True, commands=True), cameras, plugins)
    service = Service(tmp_path, config)

    def ended() -> int | None:
        stored = journal_bodies(tmp_path)
        return next((seq for seq, body in stored.items() if '"camera.down"' in body and '"plaza"' in body), None)

    try:
        end = wait(ended, "the plaza file ended", service, timeout=300)
        wait(lambda: max((e["seq"] for e in events_of(sub.messages())), default=0) >= end, "MQTT caught up", service)
        wait(lambda: latest(sub.messages()).get("vigild/plaza/state/camera") == "ended", "the camera ended", service)
        at_end = sub.messages()
        publish.single("vigild/idle/set/enabled", "OFF", qos=1, hostname="127.0.0.1", port=broker.port)
        wait(lambda: status(service)["cameras"]["idle"]["state"] == "paused", "the switch paused the camera", service)
        wait(lambda: latest(sub.messages()).get("vigild/idle/state/camera") == "paused", "paused state", service)
        publish.single("vigild/idle/set/enabled", "ON", qos=1, hostname="127.0.0.1", port=broker.port)
        wait(lambda: status(service)["cameras"]["idle"]["state"] == "streaming", "resumed", service)
        applied = service.log_text().count("configuration applied")
        # the zone goes; `loop` comes, which restarts the camera: zones and lines alone restart nothing, and a
        # camera that has ended would show its new geometry only at its next frame
        config.write_text(config.read_text().replace(zone, "    loop: true\n"))
        service.signal(signal.SIGHUP)
        wait(lambda: service.log_text().count("configuration applied") > applied, "the reload", service)
        wait(lambda: latest(sub.messages()).get("vigild/plaza/state/zones/path/total") == "", "zone cleared", service)
        after_reload = latest(sub.messages())
    finally:
        code, _ = service.stop()
        sub.stop()
        broker.stop()
    assert code == 0, service.log_text()[-3000:]
    truth = [json.loads(body) for _, body in sorted(journal_bodies(tmp_path).items()) if json.loads(body)["camera"] == "plaza"]
    truth = [e for e in truth if e["seq"] <= end]
    state = latest(at_end)
    counts = [e for e in truth if e["type"] == "zone.count" and e["zone"] == "path"]
    crossings = [e["direction"] for e in truth if e["type"] == "line.cross"]
    assert counts and crossings, "the footage has people in the zone and crossing the line"
    assert json.loads(state["vigild/plaza/state/zones/path"]) == {"counts": {"person": counts[-1]["total"]},
                                                                  "total": counts[-1]["total"]}  # fmt: skip
    assert state["vigild/plaza/state/zones/path/total"] == str(counts[-1]["total"])
    assert state["vigild/plaza/state/zones/path/occupied"] == ("ON" if counts[-1]["total"] else "OFF")
    line = json.loads(state["vigild/plaza/state/lines/crossing"])
    first_ts = next(e["ts"] for e in truth if e["run"] == truth[-1]["run"])
    assert line == {"in": crossings.count("in"), "out": crossings.count("out"), "since": first_ts}
    assert state["vigild/plaza/state/lines/crossing/in"] == str(crossings.count("in"))
    in_view, most = 0, 0
    for e in truth:
        in_view += {"track.new": 1, "track.end": -1}.get(e["type"], 0)
        most = max(most, in_view)
    seen = [int(m["payload"]) for m in at_end if m["topic"] == "vigild/plaza/state/objects/person"]
    assert max(seen) == most and seen[-1] == 0 and json.loads(state["vigild/plaza/state/objects"]) == {"person": 0}
    assert state["vigild/plaza/state/camera"] == "ended"
    assert state["vigild/plaza/state/snapshot"] == {"binary": state["vigild/plaza/state/snapshot"]["binary"], "jpeg": True}
    configs = {t: json.loads(p) for t, p in state.items() if t.startswith("homeassistant/") and p}
    assert [x for t, p in configs.items() for x in problems(t, p)] == []
    kinds = {t.split("/")[1] + ":" + t.split("/")[3] for t in configs if "_plaza/" in t}
    assert kinds >= {"sensor:state", "image:snapshot", "switch:enabled", "sensor:objects_person",
                     "binary_sensor:zone_path_occupied", "sensor:zone_path_total", "sensor:zone_path_person",
                     "sensor:line_crossing_in", "sensor:line_crossing_out"}, kinds  # fmt: skip
    for t, p in configs.items():  # every entity reads a topic that holds a value (the idle camera has no snapshot)
        if "_idle/snapshot/" not in t:
            assert p.get("state_topic", p.get("image_topic")) in state, t
    path_topics = [t for t in after_reload if "/zones/path" in t or "zone_path" in t]
    assert path_topics and all(after_reload[t] == "" for t in path_topics), path_topics
    # the line stays and goes on counting from the same `since` (counts start over only with the daemon's run)
    assert int(after_reload["vigild/plaza/state/lines/crossing/in"]) >= crossings.count("in")
    assert json.loads(after_reload["vigild/plaza/state/lines/crossing"])["since"] == first_ts
