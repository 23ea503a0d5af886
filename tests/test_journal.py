"""The event journal's store (vigild.outputs.journal): history queries, one writer, snapshots as files, retention.

The records are made here, with a known time, camera, type, track and label each, so each query's answer is known."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime

import pytest
from conftest import fill, journal_record

from vigild.outputs.journal import Journal, JournalLocked, JournalWriter, Query, Record, open_read_only, select

T0 = datetime(2026, 11, 30, 14, 0, tzinfo=UTC).timestamp()
CAMERAS = ("door", "yard", "gate")
TYPES = ("zone.enter", "zone.exit", "line.cross", "track.new", "zone_x")


def make_records(count: int, jpeg_every: int = 0, start: int = 1) -> list[Record]:
    """`count` events a minute apart from T0: cameras, types, tracks and labels in turn; a JPEG every n-th."""
    records = []
    for i in range(count):
        seq = start + i
        ts = datetime.fromtimestamp(T0 + 60 * i, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        body = {
            "schema": 1, "seq": seq, "id": f"{seq:032x}", "run": "run-a", "type": TYPES[i % len(TYPES)],
            "camera": CAMERAS[i % len(CAMERAS)], "frame": i, "ts": ts,
        }  # fmt: skip
        if i % 4 != 3:
            body["object"] = {"track_id": i % 7, "label": ("person", "car")[i % 2], "bbox": [0, 0, 1, 1]}
        jpeg = bytes([seq % 256]) * 2000 if jpeg_every and i % jpeg_every == 0 else None
        records.append(journal_record(body, jpeg))
    return records


def truth(records: list[Record], keep) -> list[int]:
    return [r.seq for r in records if keep(json.loads(r.body))]


def track_of(body):
    return (body.get("object") or {}).get("track_id")


def label_of(body):
    return (body.get("object") or {}).get("label")


QUERIES = [  # (query, which events it must return)
    (Query(), lambda b: True),
    (Query(camera="door"), lambda b: b["camera"] == "door"),
    (Query(type_prefix="zone."), lambda b: b["type"].startswith("zone.")),  # not zone_x: `_` is no wildcard
    (Query(type_prefix="line.cross"), lambda b: b["type"] == "line.cross"),
    (Query(since=T0 + 600, until=T0 + 1200), lambda b: 10 <= b["frame"] < 20),
    (
        Query(camera="yard", type_prefix="zone.", since=T0 + 3600),
        lambda b: b["camera"] == "yard" and b["type"].startswith("zone.") and b["frame"] >= 60,
    ),
    (Query(track=3), lambda b: track_of(b) == 3),
    (Query(label="car"), lambda b: label_of(b) == "car"),
    (Query(after_seq=95), lambda b: b["seq"] > 95),
    (Query(camera="gate", limit=5), None),  # the first five of gate's
]


@pytest.mark.parametrize(("query", "keep"), QUERIES)
def test_each_history_query_returns_exactly_its_events_in_seq_order(tmp_path, query, keep):
    records = make_records(120)
    journal = Journal(tmp_path / "journal.db")
    journal.write(records[:50])
    journal.write(records[50:])
    expected = truth(records, keep) if keep is not None else truth(records, lambda b: b["camera"] == "gate")[:5]
    assert [event["seq"] for event in journal.query(query)] == expected
    reader = open_read_only(tmp_path / "journal.db")  # `vigild events` beside the running daemon
    assert [event for event in select(reader, query)] == [json.loads(r.body) for r in records if r.seq in expected]
    journal.close()


def test_seq_goes_on_from_the_last_stored_and_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "state" / "journal.db"
    journal = Journal(path)
    assert journal.last_seq() == 0
    journal.write(make_records(10))
    other = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            from pathlib import Path
            from vigild.outputs.journal import Journal, JournalLocked
            try:
                Journal(Path({str(path)!r}))
            except JournalLocked as exc:
                print(exc)
            """)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert other.stdout.strip() == (
        f"the event journal {path} is in use by another vigild (pid {os.getpid()}): give each daemon "
        "a journal of its own (journal.path)"
    )
    with pytest.raises(JournalLocked):
        Journal(path)  # in this process too
    journal.close()
    again = Journal(path)
    assert again.last_seq() == 10
    again.write(make_records(5, start=11))
    assert [e["seq"] for e in again.query(Query())] == list(range(1, 16))
    again.close()


def test_snapshots_are_files_beside_the_rows_and_a_failed_batch_leaves_neither(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    records = make_records(12, jpeg_every=3)
    journal.write(records)
    files = sorted(p.name for p in journal.snapshots.iterdir())
    assert files == sorted(f"{r.seq}-{r.id}.jpg" for r in records if r.jpeg is not None)
    assert (journal.snapshots / files[0]).read_bytes() == records[0].jpeg
    clash = [*make_records(4, jpeg_every=1, start=20), records[0]]  # seq 1 again: the batch fails whole
    with pytest.raises(Exception, match="UNIQUE"):
        journal.write(clash)
    assert sorted(p.name for p in journal.snapshots.iterdir()) == files
    assert journal.last_seq() == 12
    journal.close()


def test_files_a_killed_run_left_behind_are_swept_at_open(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    records = make_records(6, jpeg_every=2)
    journal.write(records)
    journal.close()
    snapshots = tmp_path / "snapshots"
    (snapshots / f"99-{'d' * 32}.jpg").write_bytes(b"x")  # written, its row never committed
    (snapshots / f"100-{'a' * 32}.jpg.part").write_bytes(b"x")  # killed mid-write
    journal = Journal(tmp_path / "journal.db")
    assert journal.swept == 2
    assert sorted(p.name for p in snapshots.iterdir()) == sorted(
        f"{r.seq}-{r.id}.jpg" for r in records if r.jpeg is not None
    )
    journal.close()


def test_retention_removes_rows_and_their_snapshots_by_age_then_by_size(tmp_path):
    journal = Journal(tmp_path / "journal.db", retention_days=1.0)
    records = make_records(200, jpeg_every=2)  # 200 minutes from T0, 100 snapshots of 2,000 bytes
    journal.write(records)
    assert journal.prune(now=T0 + 86400 + 60 * 50 + 30) == 51  # older than a day: minutes 0..50
    kept = [e["seq"] for e in journal.query(Query())]
    assert kept == list(range(52, 201))
    assert sorted(int(p.name.split("-")[0]) for p in journal.snapshots.iterdir()) == [s for s in kept if s % 2 == 1]
    journal.max_bytes = journal.size_bytes() // 2
    removed = journal.prune(now=T0)
    assert journal.size_bytes() <= journal.max_bytes
    kept = [e["seq"] for e in journal.query(Query())]
    assert removed > 0 and kept == list(range(52 + removed, 201))  # the oldest went first
    assert sorted(int(p.name.split("-")[0]) for p in journal.snapshots.iterdir()) == [s for s in kept if s % 2 == 1]
    journal.close()


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def stored_seqs(path) -> list[int]:
    return [event["seq"] for event in select(open_read_only(path), Query())]


def test_the_writer_stores_every_event_put_in_batches_and_the_rest_at_stop(tmp_path):
    writer = JournalWriter(Journal(tmp_path / "journal.db"), batch_max=16)
    writer.start()
    records = make_records(300, jpeg_every=5)
    for record in records[:250]:
        writer.put(record)
    wait_for(lambda: writer.idle, "the writer stores what was put")
    for record in records[250:]:  # put and stopped at once: stored before the journal closes
        writer.put(record)
    writer.stop()
    assert (writer.stored, writer.not_journaled, writer.error) == (300, 0, None)
    assert stored_seqs(tmp_path / "journal.db") == list(range(1, 301))


def test_a_full_disk_costs_the_journal_only_those_events_counted_and_it_resumes_when_space_returns(small_disk, caplog):
    path = small_disk / "journal.db"
    writer = JournalWriter(Journal(path), batch_max=8, retry_s=0.2)
    writer.start()
    records = make_records(60, jpeg_every=1)  # each with a 2,000-byte snapshot
    with caplog.at_level(logging.WARNING, logger="vigild.journal"):
        for record in records[:20]:
            writer.put(record)
        wait_for(lambda: writer.idle, "the first 20 stored")
        assert (writer.stored, writer.error) == (20, None)
        fill(small_disk)
        for record in records[20:50]:  # put never blocks nor raises: the live stream goes on
            writer.put(record)
        wait_for(lambda: writer.idle, "the writer gives up what does not fit")
        assert writer.not_journaled == 30 and writer.stored == 20
        assert writer.error is not None and "No space left on device" in writer.error
        (small_disk / "filler").unlink()  # space returns
        for record in records[50:]:
            writer.put(record)
        wait_for(lambda: writer.idle and writer.stored == 30, "journaling resumes by itself")
        writer.stop()
    assert writer.error is None and writer.not_journaled == 30
    assert stored_seqs(path) == [*range(1, 21), *range(51, 61)]  # the outage is a hole in seq, nothing else
    snapshots = sorted(int(p.name.split("-")[0]) for p in (small_disk / "snapshots").iterdir())
    assert snapshots == [*range(1, 21), *range(51, 61)]  # no file of an event not journaled is left behind
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "cannot write the event journal" in errors[0].getMessage()  # once per outage
    assert any("is written again (30 events were not journaled)" in r.getMessage() for r in caplog.records)
