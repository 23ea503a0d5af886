"""`vigild events`: the journal's history through the real CLI, against events the test stored with known times,
cameras, types, tracks and labels (tests/test_journal.py makes them)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from datetime import UTC, datetime

import pytest
from conftest import journal_record, vigild
from test_journal import T0, make_records

from vigild.outputs.history import HistoryError, parse_time
from vigild.outputs.journal import Journal


def events_cli(*args: str) -> subprocess.CompletedProcess[str]:
    process = vigild("events", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope="module")
def journal_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("history") / "journal.db"
    journal = Journal(path)
    bodies = [json.loads(r.body) for r in make_records(120)]
    for body in bodies:  # line crossings with a direction, for counts per direction
        if body["type"] == "line.cross":
            body["direction"] = ("in", "out", "in")[body["seq"] % 3]
    journal.write([journal_record(body) for body in bodies])
    journal.close()
    return path, bodies


def car(body) -> bool:
    return body["object"]["label"] == "car"


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("args", "keep"),
    [
        ((), lambda b: True),
        (("--camera", "door"), lambda b: b["camera"] == "door"),
        (("--type", "zone."), lambda b: b["type"].startswith("zone.")),
        (("--since", iso(T0 + 600), "--until", iso(T0 + 1200)), lambda b: 10 <= b["frame"] < 20),
        (("--since", "2026-11-30T15:00"), lambda b: b["frame"] >= 60),  # no zone: UTC
        (("--track", "3", "--label", "car"), lambda b: (b.get("object") or {}).get("track_id") == 3 and car(b)),
        (("--after-seq", "100", "--limit", "7"), lambda b: 100 < b["seq"] <= 107),
    ],
)
def test_each_filter_prints_exactly_its_events_as_json_lines(journal_path, args, keep):
    path, bodies = journal_path
    result = events_cli("--journal", str(path), *args)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [b for b in bodies if keep(b)]


def test_line_crossings_per_direction_in_a_time_window_and_totals_per_camera_and_type(journal_path):
    path, bodies = journal_path
    window = [b for b in bodies if b["type"] == "line.cross" and T0 + 1800 <= datetime.fromisoformat(
        b["ts"].replace("Z", "+00:00")).timestamp() < T0 + 5400]  # fmt: skip
    result = events_cli("--journal", str(path), "--type", "line.cross", "--since", iso(T0 + 1800), "--until",
                        iso(T0 + 5400), "--count-by", "camera,direction")  # fmt: skip
    assert result.returncode == 0, result.stderr
    expected: dict[tuple[str, str], int] = {}
    for b in window:
        expected[(b["camera"], b["direction"])] = expected.get((b["camera"], b["direction"]), 0) + 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(r["camera"], r["direction"]): r["count"] for r in rows} == expected and len(rows) == len(expected)
    assert [r["count"] for r in rows] == sorted((r["count"] for r in rows), reverse=True)  # most first
    totals = events_cli("--journal", str(path), "--count-by", "camera,type", "--format", "csv")
    counted = {(r["camera"], r["type"]): int(r["count"]) for r in csv.DictReader(io.StringIO(totals.stdout))}
    assert sum(counted.values()) == len(bodies)
    assert counted[("door", "zone.enter")] == sum(b["camera"] == "door" and b["type"] == "zone.enter" for b in bodies)


def test_csv_and_table_show_the_same_events(journal_path):
    path, bodies = journal_path
    rows = list(csv.DictReader(io.StringIO(events_cli("--journal", str(path), "--camera", "yard", "--format",
                                                      "csv").stdout)))  # fmt: skip
    yard = [b for b in bodies if b["camera"] == "yard"]
    assert [int(r["seq"]) for r in rows] == [b["seq"] for b in yard]
    assert [r["track"] for r in rows] == [str((b.get("object") or {}).get("track_id", "")) for b in yard]
    table = events_cli("--journal", str(path), "--camera", "yard", "--format", "table").stdout.splitlines()
    assert table[0].split()[:4] == ["seq", "ts", "camera", "type"]
    assert [int(line.split()[0]) for line in table[1:]] == [b["seq"] for b in yard]


def test_relative_times_count_back_from_now(tmp_path):
    now = time.time()
    journal = Journal(tmp_path / "journal.db")
    records = []
    for seq, minutes_ago in enumerate((120, 50, 20, 5, 1), 1):  # events 2 h, 50, 20, 5 and 1 min ago
        ts = datetime.fromtimestamp(now - 60 * minutes_ago, tz=UTC).isoformat(timespec="milliseconds")
        records.append(journal_record({"schema": 1, "seq": seq, "id": f"{seq:032x}", "run": "r", "type": "zone.enter",
                               "camera": "door", "frame": seq, "ts": ts.replace("+00:00", "Z")}))  # fmt: skip
    journal.write(records)
    journal.close()
    for since, seqs in (("15m", [4, 5]), ("1h", [2, 3, 4, 5]), ("3h", [1, 2, 3, 4, 5]), ("90s", [5])):
        result = events_cli("--journal", str(tmp_path / "journal.db"), "--since", since)
        assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == seqs, since


def test_wrong_input_gets_a_clear_error(tmp_path, journal_path):
    path, _ = journal_path
    bad_time = events_cli("--journal", str(path), "--since", "yesterday")
    assert bad_time.returncode == 2
    assert "vigild events: --since 'yesterday': expected a time in ISO 8601" in bad_time.stderr
    missing = events_cli("--journal", str(tmp_path / "none.db"))
    assert missing.returncode == 2 and f"no event journal at {tmp_path / 'none.db'}" in missing.stderr
    (tmp_path / "notes.db").write_text("not a database")
    other = events_cli("--journal", str(tmp_path / "notes.db"))
    assert other.returncode == 2 and "is not a vigild event journal" in other.stderr
    fields = events_cli("--journal", str(path), "--count-by", "camera;drop table events")
    assert fields.returncode == 2 and "expected field names separated by commas" in fields.stderr
    with pytest.raises(HistoryError):
        parse_time("12 parsecs")


def test_counts_as_a_table(journal_path):
    path, bodies = journal_path
    lines = events_cli("--journal", str(path), "--count-by", "camera", "--format", "table").stdout.splitlines()
    assert lines[0].split() == ["camera", "count"]
    assert {line.split()[0]: int(line.split()[1]) for line in lines[1:]} == {
        camera: sum(b["camera"] == camera for b in bodies) for camera in ("door", "yard", "gate")
    }
