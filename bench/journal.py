"""The event journal's costs (issue 19), in one run:

1. **Write rate**: events/s the journal's writer stores (batches of 512, one transaction each), for events as the
   analytics make them (a zone event with its object), without snapshots and with an 8 KB JPEG on one in ten.
2. **Detection with the journal on and off**: the real daemon on vtest.avi (looping, as fast as the chain goes)
   with Yolo-Fastest-XL, ByteTrack and the analytics (a line, a zone, crop snapshots), each in a fresh process,
   alternately on and off, `--rounds` times; detection frames/s and the ratio on ÷ off.
3. **Query time**: a generated day of `--day-cameras` cameras at `--rate` events/s each (16 × 10 × 86,400 =
   13.8 M events by default) in a journal; then `vigild events`' query for one camera, one type and one hour
   (cold, then the median of 5), and its count per direction.

    python bench/journal.py [--seconds 30] [--rounds 2] [--cameras 1] [--day-cameras 16] [--rate 10]
                            [--skip-daemon] [--skip-day] [--day-path PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from contenders import in_fresh_process, run_daemon, vtest_daemon_yaml

SHARED = Path(os.environ.get("VIGILD_SHARED", Path(__file__).resolve().parent.parent.parent / "shared")).resolve()
TYPES = ("zone.enter", "zone.exit", "line.cross", "track.start", "track.end")
ANALYTICS = "  - type: analytics\n    min_frames: 3\n    snapshot: crop\n"
GEOMETRY = (
    "    lines:\n      crossing: {points: [[250, 120], [250, 576]]}\n"
    "    zones:\n      path: {points: [[0, 0.31], [1, 0.21], [1, 0.73], [0, 0.73]], normalized: true}\n"
)


def write_rate(count: int, snapshot_every: int) -> float:
    """Events/s through `JournalWriter.put_event` until stored."""
    from vigild.events import Event
    from vigild.outputs.journal import Journal, JournalWriter
    from vigild.vision.snapshot import Snapshot

    place = Path(tempfile.mkdtemp(prefix="vigild-bench-write-"))
    writer = JournalWriter(Journal(place / "journal.db"), run="0" * 32)
    jpeg = os.urandom(8000)
    events = []
    for i in range(count):
        obj = {"track_id": i % 50, "label": "person", "confidence": 0.8, "bbox": [10.0, 20.0, 110.0, 220.0]}
        snapshot = Snapshot(jpeg, "crop", 100, 200) if snapshot_every and i % snapshot_every == 0 else None
        events.append(Event("zone.enter", f"cam{i % 16}", time.time(), i, obj, {"zone": "path"}, snapshot))
    writer.start()
    began = time.perf_counter()
    for seq, event in enumerate(events, 1):
        writer.put_event(seq, f"{seq:032x}", event)
    while not writer.idle:
        time.sleep(0.001)
    elapsed = time.perf_counter() - began
    writer.stop()
    assert writer.stored == count and writer.not_journaled == 0
    return count / elapsed


def daemon_ratio(args: argparse.Namespace) -> None:
    print(f"\n2. daemon: {args.cameras} looping vtest.avi, Yolo-Fastest-XL 320 + ByteTrack + analytics (crop "
          f"snapshots), {args.device}, {args.seconds:.0f} s windows")  # fmt: skip
    print(f"{'round':>5} {'journal':>7} {'fps':>7} {'events/s':>9} {'stored':>7} {'not stored':>10}")
    fps: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for on in (False, True) if round_ % 2 == 0 else (True, False):
            text = vtest_daemon_yaml(SHARED, args.cameras, ANALYTICS, args.device, journal=on, camera_extra=GEOMETRY)
            result = in_fresh_process(run_daemon, (text, args.warmup, args.seconds), args.warmup + args.seconds + 600)
            fps[on].append(result["fps"])
            journal = result["journal"]
            print(f"{round_:>5} {'on' if on else 'off':>7} {result['fps']:>7.1f} {result['events_s']:>9.1f} "
                  f"{journal.get('stored', '-'):>7} {journal.get('not_journaled', '-'):>10}", flush=True)  # fmt: skip
    on, off = statistics.mean(fps[True]), statistics.mean(fps[False])
    print(f"detection with the journal on / off: {on:.1f} / {off:.1f} frames/s = {on / off:.2f}x")


def generate_day(path: Path, cameras: int, rate: float, t0: float, seconds: float = 86400) -> int:
    """A day (or `seconds`) of `cameras` cameras at `rate` events/s each, stored as the journal stores them (rows
    straight into its table, a million at a time: the writer's own rate is measured in 1)."""
    import json
    import random

    from vigild.outputs.journal import Journal

    journal = Journal(path, retention_days=36_500, max_bytes=1 << 50)
    db = journal._db  # bulk insert: the same schema, without building each event
    total = int(cameras * rate * seconds)
    step = 1.0 / (cameras * rate)
    rng = random.Random(7)
    batch = []
    run = "0" * 32
    for seq in range(1, total + 1):
        ts = t0 + seq * step
        camera = f"cam{seq % cameras:02d}"
        kind = TYPES[rng.randrange(len(TYPES))]
        track = rng.randrange(100_000)
        body = {"schema": 1, "seq": seq, "id": f"{seq:032x}", "run": run, "type": kind, "camera": camera,
                "frame": seq // cameras, "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".000Z",
                "object": {"track_id": track, "label": "person", "confidence": 0.8, "bbox": [1.0, 2.0, 3.0, 4.0]}}  # fmt: skip
        if kind == "line.cross":
            body.update(line="entry", direction="in" if rng.random() < 0.5 else "out")
        elif kind.startswith("zone."):
            body["zone"] = "path"
        batch.append((seq, body["id"], run, ts, camera, kind, track, "person", json.dumps(body), None, 0))
        if len(batch) == 1_000_000:
            db.execute("BEGIN")
            db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
            db.execute("COMMIT")
            batch.clear()
    if batch:
        db.execute("BEGIN")
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    journal.close()
    return total


def query_times(args: argparse.Namespace) -> None:
    from vigild.outputs import history
    from vigild.outputs.journal import Query

    path = Path(args.day_path) if args.day_path else Path(tempfile.mkdtemp(prefix="vigild-bench-day-")) / "journal.db"
    t0 = 1_790_000_000.0
    if not path.exists():
        began = time.perf_counter()
        total = generate_day(path, args.day_cameras, args.rate, t0)
        print(f"\n3. generated {total:,} events ({args.day_cameras} cameras x {args.rate:g}/s x 24 h) in "
              f"{time.perf_counter() - began:.0f} s: {path.stat().st_size / 1e9:.2f} GB")  # fmt: skip
    else:  # made by an earlier run (or version): opened once for writing, as the daemon would, its schema applied
        from vigild.outputs.journal import Journal

        began = time.perf_counter()
        Journal(path, retention_days=36_500, max_bytes=1 << 50).close()
        print(f"\n3. {path}: opened for writing in {time.perf_counter() - began:.1f} s (indexes it lacked built)")
    query = Query(camera="cam07", type_prefix="line.cross", since=t0 + 14 * 3600, until=t0 + 15 * 3600)
    timings, parsed = [], []
    for _ in range(6):  # as `vigild events` prints JSON lines: the stored text, unparsed
        db = history.open_journal(path)
        began = time.perf_counter()
        events = list(history.select_text(db, query))
        timings.append(time.perf_counter() - began)
        db.close()
    for _ in range(5):  # as a program reading it through `select`: each event parsed
        db = history.open_journal(path)
        began = time.perf_counter()
        list(history.select(db, query))
        parsed.append(time.perf_counter() - began)
        db.close()
    counted = []
    for _ in range(5):
        db = history.open_journal(path)
        began = time.perf_counter()
        counts = history.counts(db, query, ["direction"])
        counted.append(time.perf_counter() - began)
        db.close()
    print(f"one camera, one type, one hour: {len(events)} events in {timings[0] * 1000:.0f} ms cold, "
          f"{statistics.median(timings[1:]) * 1000:.0f} ms (median of 5); parsed into dicts "
          f"{statistics.median(parsed) * 1000:.0f} ms; per direction {counts} in "
          f"{statistics.median(counted) * 1000:.0f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000, help="1: events written")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cameras", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--day-cameras", type=int, default=16)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--day-path", help="3: an existing generated day (or where to make it)")
    parser.add_argument("--skip-daemon", action="store_true")
    parser.add_argument("--skip-day", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    print("1. journal writer (batches of 512, one transaction each)")
    for every, what in ((0, "no snapshots"), (10, "an 8 KB snapshot on 1 in 10")):
        print(f"   {what}: {write_rate(args.events, every):,.0f} events/s", flush=True)
    if not args.skip_daemon:
        daemon_ratio(args)
    if not args.skip_day:
        query_times(args)


if __name__ == "__main__":
    main()
