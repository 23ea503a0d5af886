"""The MQTT output's costs (issue 31), against Debian's mosquitto on a free loopback port, in one run:

1. **Detection with the MQTT output on and off**: the real daemon on vtest.avi (looping, as fast as the chain goes)
   with Yolo-Fastest-XL, ByteTrack and the analytics (a line, a zone, crop snapshots), each in a fresh process,
   alternately on and off, `--rounds` times; detection frames/s, the median of each and the ratio on / off (the
   goal: >= 0.95), with the spread. "On" is the MQTT output with retained state and Home Assistant discovery.
2. **Draining a backlog**: a journal holding `--backlog-minutes` of events of `--backlog-cameras` cameras at
   `--backlog-rate` events/s each (16 x 10/s x 10 min = 96,000 by default), as after an outage; an MQTT output whose
   cursor is at its start catches up to a persistent-session subscriber (a process of its own): seconds until the
   broker acknowledged all of it (the output's cursor at the end), until the subscriber had all of it, and the
   events/s that makes: the rate the output sustains to a local mosquitto. `--rounds` rounds; medians and spread.

    python bench/mqtt.py [--seconds 30] [--warmup 10] [--rounds 3] [--cameras 1] [--backlog-minutes 10]
                         [--backlog-cameras 16] [--backlog-rate 10] [--skip-daemon] [--skip-backlog]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from contenders import in_fresh_process, start_daemon, vtest_daemon_yaml
from journal import ANALYTICS, GEOMETRY, SHARED, generate_day

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from mqtt_broker import Broker, Subscriber


def run_daemon(text: str, warmup: float, seconds: float, results: Any) -> None:
    """(In a fresh process.) The daemon of `text`, started; after `warmup` s, frames/s and events/s over `seconds`,
    and the MQTT output's status at the end (if it has one)."""
    daemon = start_daemon(text)
    daemon.start()
    try:
        time.sleep(warmup)
        frames0, events0 = sum(daemon.scheduler.processed.values()), daemon.publisher.last_seq
        began = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        frames = sum(daemon.scheduler.processed.values()) - frames0
        events = daemon.publisher.last_seq - events0
        mqtt = daemon.outputs.status().get("mqtt", {})
    finally:
        daemon.stop()
    results.put({"fps": frames / elapsed, "events_s": events / elapsed, "mqtt": mqtt})


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def daemon_ratio(args: argparse.Namespace, broker: Broker) -> None:
    print(f"1. daemon: {args.cameras} looping vtest.avi, Yolo-Fastest-XL 320 + ByteTrack + analytics (crop "
          f"snapshots), {args.device}, {args.seconds:.0f} s windows; MQTT with state and discovery")  # fmt: skip
    print(f"{'round':>5} {'mqtt':>5} {'fps':>7} {'events/s':>9} {'delivered':>9} {'lag':>5} {'connected':>9}")
    output = (f"outputs:\n  - type: mqtt\n    url: {broker.url}\n    daemon_id: bench\n    homeassistant: true\n")
    fps: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for on in (False, True) if round_ % 2 == 0 else (True, False):
            text = vtest_daemon_yaml(SHARED, args.cameras, ANALYTICS, args.device, camera_extra=GEOMETRY)
            text += output if on else ""
            result = in_fresh_process(run_daemon, (text, args.warmup, args.seconds), args.warmup + args.seconds + 600)
            fps[on].append(result["fps"])
            mqtt = result["mqtt"]
            print(f"{round_:>5} {'on' if on else 'off':>5} {result['fps']:>7.1f} {result['events_s']:>9.1f} "
                  f"{mqtt.get('delivered', '-'):>9} {mqtt.get('lag_events', '-'):>5} "
                  f"{mqtt.get('connected', '-')!s:>9}", flush=True)  # fmt: skip
    on, off = statistics.median(fps[True]), statistics.median(fps[False])
    print(f"detection frames/s, medians with the MQTT output on / off: {on:.1f} ({spread(fps[True])}) / {off:.1f} "
          f"({spread(fps[False])}) = {on / off:.3f}x")  # fmt: skip


class Stored:
    """The journal link of an output catching up from a finished journal (vigild.outputs.catchup.JournalLink)."""

    def __init__(self, database: Path, through: int):
        self.database, self.through = database, through


def drain(args: argparse.Namespace, broker: Broker, database: Path, total: int, round_: int) -> tuple[float, float]:
    """Seconds until the broker acknowledged the whole backlog, and until the subscriber had it."""
    import sqlite3

    from vigild.config.outputs import MqttOutputConfig
    from vigild.outputs.mqtt import MqttContext, MqttOutput

    out = Path(tempfile.mkdtemp(prefix="vigild-bench-mqtt-")) / "got.jsonl"
    subscriber = Subscriber(broker, out, "vigild/+/+", f"bench-sub-{round_}")
    lines = lambda: out.read_bytes().count(b"\n") if out.exists() else 0  # noqa: E731
    try:
        import paho.mqtt.publish as publish

        deadline = time.monotonic() + 30
        while lines() == 0:  # subscribed (its session exists) once a probe arrives
            publish.single("vigild/probe/probe", "{}", qos=1, hostname="127.0.0.1", port=broker.port)
            if time.monotonic() > deadline:
                raise RuntimeError("the subscriber never subscribed")
            time.sleep(0.2)
        probes = lines()
        db = sqlite3.connect(database)
        db.execute("INSERT OR REPLACE INTO output_cursors VALUES ('mqtt', 0, 0)")  # catch up from the start
        db.commit()
        db.close()
        config = MqttOutputConfig(type="mqtt", url=broker.url, daemon_id="bench", client_id=f"bench-out-{round_}")
        output = MqttOutput(config, Stored(database, total), MqttContext("bench", "bench"))
        began = time.monotonic()
        output.start()
        while (output.stored or 0) < total:
            time.sleep(0.05)
        acked = time.monotonic() - began
        output.stop()
        while lines() < probes + total:
            time.sleep(0.05)
            if time.monotonic() - began > 3600:
                raise RuntimeError(f"the subscriber has {lines() - probes} of {total}")
        received = time.monotonic() - began
    finally:
        subscriber.stop()
    return acked, received


def backlog(args: argparse.Namespace, broker: Broker) -> None:
    seconds = args.backlog_minutes * 60
    database = Path(tempfile.mkdtemp(prefix="vigild-bench-backlog-")) / "journal.db"
    total = generate_day(database, args.backlog_cameras, args.backlog_rate, time.time() - seconds, seconds)
    print(f"\n2. a backlog of {args.backlog_minutes:g} min: {args.backlog_cameras} cameras x "
          f"{args.backlog_rate:g} events/s = {total:,} events, caught up to a local mosquitto (QoS 1, inflight 100) "
          f"and a persistent-session subscriber")  # fmt: skip
    print(f"{'round':>5} {'acked s':>8} {'received s':>10} {'events/s':>9}")
    acked, received = [], []
    for round_ in range(args.rounds):
        a, r = drain(args, broker, database, total, round_)
        acked.append(a)
        received.append(r)
        print(f"{round_:>5} {a:>8.1f} {r:>10.1f} {total / a:>9,.0f}", flush=True)
    a, r = statistics.median(acked), statistics.median(received)
    print(f"drained in {a:.1f} s (median; {spread(acked)}), the subscriber had all of it after {r:.1f} s "
          f"({spread(received)}): {total / a:,.0f} events/s sustained (the 10-minute backlog in "
          f"{a / seconds * 100:.1f}% of the outage's length)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cameras", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backlog-minutes", type=float, default=10.0)
    parser.add_argument("--backlog-cameras", type=int, default=16)
    parser.add_argument("--backlog-rate", type=float, default=10.0)
    parser.add_argument("--skip-daemon", action="store_true")
    parser.add_argument("--skip-backlog", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    logging.getLogger("paho.mqtt.client").setLevel(logging.CRITICAL)  # publish.single's "not connected" as it ends
    broker = Broker(Path(tempfile.mkdtemp(prefix="vigild-bench-mosquitto-"))).start()
    try:
        if not args.skip_daemon:
            daemon_ratio(args, broker)
        if not args.skip_backlog:
            backlog(args, broker)
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
