"""The event bus and its outputs (vigild.outputs.bus, .base, .catchup, .file): events reach outputs from one place,
the wire JSON is built once and is the same bytes everywhere, a slow output slows nobody, and an output that
catches up ends with every event once, in order, with gap notices where the journal has none."""

from __future__ import annotations

import ast
import json
import math
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, VTEST, journal_record
from service import Service, camera_yaml, service_config

from vigild.config.outputs import FileOutputConfig
from vigild.events import Event
from vigild.outputs.base import QueuedOutput
from vigild.outputs.bus import EventBus, Stamped
from vigild.outputs.file import FileOutput
from vigild.outputs.journal import Journal, JournalWriter
from vigild.vision.snapshot import Snapshot


def calls_to(attribute: str) -> list[str]:
    """Where daemon/ and plugins/ call `<something>.<attribute>(...)`: file:line."""
    found = []
    for path in sorted([*ROOT.joinpath("daemon").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attribute:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_events_reach_outputs_from_the_bus_only():
    """An output is fed by `feed`, and only the bus calls it; only the bus stamps events."""
    assert [site.split(":")[0] for site in calls_to("feed")] == ["daemon/outputs/bus.py"]
    stamped = [
        f"{path.relative_to(ROOT)}"
        for path in ROOT.joinpath("daemon").rglob("*.py")
        if "Stamped(" in path.read_text() and path.name != "bus.py"
    ]
    assert stamped == []
    assert calls_to("to_json_dict") == [site for site in calls_to("to_json_dict") if site.startswith("daemon/outputs/bus.py")]


def test_the_journal_never_parses_the_json_it_stores():
    source = (ROOT / "daemon/outputs/journal.py").read_text()
    tree = ast.parse(source)
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert "json" not in names and "loads" not in attributes and "epoch" not in {
        n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }


class Gate(QueuedOutput):
    """An output stuck in its delivery until the gate opens (a broker that does not answer)."""

    def __init__(self, queue_size: int):
        super().__init__("gate", queue_size)
        self.open_gate = threading.Event()
        self.got: list[int] = []

    def deliver(self, batch: list[Stamped]) -> None:
        self.open_gate.wait()
        self.got += [item.seq for item in batch]
        self.delivered += len(batch)


def event(i: int, **data: object) -> Event:
    return Event("zone.enter", "door", 1_800_000_000.0 + i, i, {"track_id": i, "label": "person"}, dict(data))


def test_one_wire_json_per_event_the_same_bytes_in_the_file_and_the_journal_and_a_stuck_output_slows_nobody(
    tmp_path, monkeypatch
):
    built: list[int] = []
    original = Event.to_json_dict

    def counted(self, seq, event_id, run=""):
        built.append(seq)
        return original(self, seq, event_id, run)

    monkeypatch.setattr(Event, "to_json_dict", counted)
    writer = JournalWriter(Journal(tmp_path / "journal.db"))
    file_output = FileOutput(FileOutputConfig(type="file", path=tmp_path / "events.jsonl", catch_up=False), None)
    gate = Gate(queue_size=10)
    bus = EventBus()
    for output in (writer, file_output, gate):
        output.start()
        bus.attach(output)
    snapshot = Snapshot(b"\xff\xd8jpeg", "crop", 4, 4)
    for i in range(1, 301):  # the gate holds its first batch: the bus and the others go on
        bus.publish(event(i, n=i) if i % 50 else Event("zone.enter", "door", 1_800_000_000.0, i, snapshot=snapshot))
    bus.publish(event(301, score=math.nan))  # no output can send it: counted, not the end of anything
    deadline = time.monotonic() + 60
    while not (writer.idle and file_output.last_seq == 301):
        assert time.monotonic() < deadline, (writer.queued, file_output.status())
        time.sleep(0.02)
    gate.open_gate.set()
    for output in (gate, file_output, writer):
        output.stop()
    assert sorted(built) == list(range(1, 302))  # once per event, whichever output asked first
    lines = (tmp_path / "events.jsonl").read_bytes().splitlines()
    db = sqlite3.connect(tmp_path / "journal.db")
    stored = db.execute("SELECT seq, body, track, label, snapshot FROM events ORDER BY seq").fetchall()
    assert [row[0] for row in stored] == list(range(1, 301))
    assert lines == [row[1].encode() for row in stored]  # byte for byte the same JSON
    for (seq, _, track, label, snapshot_name), line in zip(stored, lines, strict=True):
        wire = json.loads(line)
        assert wire["seq"] == seq and wire["ts"].endswith("Z") and wire["camera"] == "door"
        if seq % 50:
            assert (track, label, wire["n"]) == (seq, "person", seq) and snapshot_name is None
        else:
            assert wire["snapshot"]["bytes"] == 6 and snapshot_name == f"{seq}-{wire['id']}.jpg"
    assert writer.not_journaled == 1 and file_output.drops["unsendable"] == 1
    # the stuck output kept what fitted and counted the rest; nobody waited for it
    # (its first 10, in the batch it held when it stuck or queued, and at most 10 more its queue held meanwhile)
    kept = len(gate.got)
    assert 10 <= kept <= 20 and gate.got[:10] == list(range(1, 11)) and gate.got == sorted(set(gate.got))
    assert gate.drops["queue_full"] == 301 - kept
    assert file_output.status()["drops"] == {"unsendable": 1} and gate.status()["drops"] == {"queue_full": 301 - kept}


def stored_journal(path: Path, seqs: list[int], old: set[int] = frozenset()) -> JournalWriter:
    journal = Journal(path, retention_days=30)
    journal.write([journal_record({"schema": 1, "seq": s, "id": f"{s:032x}", "run": "0" * 32, "type": "zone.enter",
                                   "camera": "door", "frame": s,
                                   "ts": "2020-01-01T00:00:00Z" if s in old else "2030-01-01T00:00:00Z"}) for s in seqs])  # fmt: skip
    journal.prune()
    return JournalWriter(journal)  # not started: its `through` is the journal's last seq


def read_lines(path: Path) -> list[object]:
    """Each line: an event's seq, or ("gap", first, last, reason)."""
    out: list[object] = []
    for line in path.read_text().splitlines():
        body = json.loads(line)
        out.append(("gap", body["gap"]["first"], body["gap"]["last"], body["gap"]["reason"]) if "gap" in body else body["seq"])
    return out


def test_an_output_catches_up_from_its_cursor_with_gap_notices_where_the_journal_has_none(tmp_path):
    """Journal: 1-10 and 16-40 stored, 11-15 never journaled, 1-4 then removed by retention. The output's cursor
    says it delivered up to 2: it gets a notice for 3-4 (retention), 5-10, a notice for 11-15 (not journaled),
    16-40, then the live events 41-45 in order; a new id starts with the live events."""
    writer = stored_journal(tmp_path / "journal.db", [*range(1, 11), *range(16, 41)], old={1, 2, 3, 4})
    db = sqlite3.connect(tmp_path / "journal.db", isolation_level=None)
    db.execute("INSERT INTO output_cursors VALUES ('archive', 2, 0)")
    bus = EventBus()
    bus.continue_from(writer.through)
    archive = FileOutput(FileOutputConfig(type="file", id="archive", path=tmp_path / "archive.jsonl"), writer)
    fresh = FileOutput(FileOutputConfig(type="file", id="fresh", path=tmp_path / "fresh.jsonl"), writer)
    for output in (archive, fresh):
        output.start()
        bus.attach(output)
    writer.journal.write([journal_record({"schema": 1, "seq": s, "id": f"{s:032x}", "run": "0" * 32, "type": "zone.enter",
                                          "camera": "door", "frame": s, "ts": "2030-01-01T00:00:00Z"}) for s in range(41, 46)])  # fmt: skip
    for s in range(41, 46):  # live, as the bus would have them (the journal has them too)
        bus.publish(Event("zone.enter", "door", 1_900_000_000.0, s))
    writer.through = 45
    deadline = time.monotonic() + 60
    while not (archive.cursor == 45 and fresh.cursor == 45):
        assert time.monotonic() < deadline, (archive.status(), fresh.status())
        time.sleep(0.02)
    archive.stop(), fresh.stop()
    assert read_lines(tmp_path / "archive.jsonl") == [
        ("gap", 3, 4, "retention"), *range(5, 11), ("gap", 11, 15, "not_journaled"), *range(16, 46)
    ]
    assert read_lines(tmp_path / "fresh.jsonl") == list(range(41, 46))
    cursors = dict(db.execute("SELECT output, seq FROM output_cursors").fetchall())
    assert cursors == {"archive": 45, "fresh": 45}
    writer.journal.close()


def test_an_output_that_cannot_start_shows_failed_with_its_error_and_the_next_reload_starts_it(tmp_path):
    """Its file's directory is missing when it starts: the others go on, the status says `failed` and why; once the
    directory is there, a reload with the same config starts it and it gets the events from then on."""
    from vigild.service.outputs import Outputs

    bus = EventBus()
    good = FileOutputConfig(type="file", id="good", path=tmp_path / "good.jsonl")
    late = FileOutputConfig(type="file", id="late", path=tmp_path / "later" / "late.jsonl")
    outputs = Outputs(bus, lambda: None)
    for entry in (good, late):
        outputs._start(entry)
    status = outputs.status()
    assert status["good"]["state"] == "running", status
    assert status["late"]["state"] == "failed" and "later" in status["late"]["error"], status
    bus.publish(event(1))
    (tmp_path / "later").mkdir()
    assert outputs.apply([good, late]) == {"started": [], "stopped": [], "restarted": ["late"]}
    assert outputs.status()["late"]["state"] == "running"
    bus.publish(event(2))
    outputs.stop()
    assert read_lines(tmp_path / "good.jsonl") == [1, 2]
    assert read_lines(tmp_path / "later" / "late.jsonl") == [2]


def test_checking_a_file_output_creates_nothing_and_names_what_is_wrong(tmp_path):
    """A reload checks its new outputs before anything changes; a reload refused later must leave no file behind."""
    from vigild.service.outputs import check_output

    assert check_output(FileOutputConfig(type="file", path=tmp_path / "new.jsonl")) == ("", "")
    assert not (tmp_path / "new.jsonl").exists()
    (tmp_path / "old.jsonl").write_text("kept\n")
    assert check_output(FileOutputConfig(type="file", path=tmp_path / "old.jsonl")) == ("", "")
    assert (tmp_path / "old.jsonl").read_text() == "kept\n"
    (tmp_path / "a_directory").mkdir()
    for path, reason in [(tmp_path / "missing" / "a.jsonl", "no directory"), (tmp_path / "a_directory", "Is a directory")]:
        key, problem = check_output(FileOutputConfig(type="file", path=path))
        assert key == "path" and f"cannot open {path}: " in problem and reason in problem, problem
    (tmp_path / "target.jsonl").write_text("")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "target.jsonl")
    key, problem = check_output(FileOutputConfig(type="file", path=tmp_path / "link.jsonl"))
    assert key == "path" and problem  # never through a symbolic link


def test_outputs_config_is_checked_with_its_line(tmp_path):
    from vigild.config.loading import ConfigError, load_config

    base = f"cameras:\n  door:\n    source: {VTEST}\n"
    for outputs, expected in [
        ("outputs:\n  - type: file\n    path: a.jsonl\n  - type: file\n    path: b.jsonl\n",
         "entry 1's id 'file' is entry 0's too"),
        ("outputs:\n  - type: file\n    id: journal\n    path: a.jsonl\n", "the built-in output's too"),
        ("outputs:\n  - type: kafka\n    path: a.jsonl\n", "'file', 'mqtt'"),
        ("outputs:\n  - type: mqtt\n    path: a.jsonl\n", "outputs.0.url: required key is missing"),
        ("outputs:\n  - type: file\n    path: a.jsonl\n    url: x\n", "outputs.0.url: unknown key (allowed: id, queue_size, catch_up, type, path, fsync)"),
        ("outputs:\n  - type: file\n", "path"),
        ("outputs:\n  - type: file\n    path: a.jsonl\n    colour: red\n", "colour"),
    ]:  # fmt: skip
        config = tmp_path / "vigild.yaml"
        config.write_text(base + outputs)
        with pytest.raises(ConfigError) as caught:
            load_config(config)
        message = str(caught.value)
        assert str(config) in message and "outputs" in message and expected in message, message
        assert ":5" in message or ":6" in message or ":7" in message or ":4" in message, message


@pytest.mark.e2e
def test_a_file_output_removed_for_30_s_and_added_back_ends_with_every_event_once_in_order(tmp_path):
    """A running daemon (one event per frame, the journal on) with `outputs: [{type: file}]`: a reload removes the
    output for 30 s and another adds it back; after a clean stop the file holds every event from its first on,
    once each, in seq order, byte for byte as the journal stored them, those made while it was away included."""
    journal, out = tmp_path / "journal.db", tmp_path / "events.jsonl"
    cameras = camera_yaml("door", VTEST, loop=True)
    extra = f"journal:\n  path: {journal}\n  replay_endpoint: ipc://{tmp_path}/replay\n"
    output = f"outputs:\n  - type: file\n    path: {out}\n"
    config = service_config(tmp_path, cameras, f"ipc://{tmp_path}/pub", extra=extra + output)
    service = Service(tmp_path, config)

    def file_seqs() -> list[int]:
        return [json.loads(line)["seq"] for line in out.read_text().splitlines()] if out.exists() else []

    def journal_last() -> int:
        try:
            db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
            return int(db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])
        except sqlite3.Error:
            return 0

    def wait(condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline and service.process.poll() is None, f"never: {what}\n" + service.log_text()[-3000:]
            time.sleep(0.2)

    def reload(text: str) -> None:
        applied = service.log_text().count("configuration applied")
        config.write_text(text)
        service.signal(signal.SIGHUP)
        wait(lambda: service.log_text().count("configuration applied") > applied, "the reload applied")

    try:
        wait(lambda: len(file_seqs()) >= 20, "20 events in the file")
        with_output = config.read_text()
        reload(with_output.replace(output, ""))
        removed_at, last_written = journal_last(), file_seqs()[-1]
        time.sleep(30)  # the daemon runs on: events go to the journal (and the publisher), not to the file
        wait(lambda: journal_last() >= removed_at + 50, "50 events while the output is away")
        away = journal_last()
        assert file_seqs()[-1] == last_written  # it was stopped
        reload(with_output)
        wait(lambda: file_seqs() and file_seqs()[-1] > away + 20, "the output caught up and went on live")
    finally:
        code, _ = service.stop()
    assert code == 0, service.log_text()[-3000:]
    assert "output file stopped" in service.log_text() and "output file (file) started" in service.log_text()
    lines = out.read_bytes().splitlines()
    assert all(b'"gap"' not in line[:8] for line in lines)  # the journal had every event: no gap notices
    seqs = [json.loads(line)["seq"] for line in lines]
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    stored = dict(db.execute("SELECT seq, body FROM events WHERE seq >= ?", (seqs[0],)).fetchall())
    assert seqs == sorted(stored) == list(range(seqs[0], seqs[-1] + 1))  # every event once, in order, to the end
    assert [line.decode() for line in lines] == [stored[seq] for seq in seqs]
    assert seqs[0] < removed_at < away < seqs[-1]  # and those made while it was away are there


def test_the_wire_json_is_the_documented_one_byte_for_byte():
    """The bytes an event goes out as (docs/events.md: compact, envelope first, `ts` ISO in UTC with milliseconds)."""
    obj = {"track_id": 3, "label": "person", "class_id": 0, "confidence": 0.9, "bbox": [1.0, 2.0, 3.0, 4.0]}
    item = Stamped(7, "a" * 32, "b" * 32, Event("zone.enter", "door", 1_800_000_000.25, 12, obj, {"zone": "path"}))
    assert item.wire() == (
        b'{"schema":1,"seq":7,"id":"' + b"a" * 32 + b'","run":"' + b"b" * 32 + b'","type":"zone.enter","camera":"door",'
        b'"frame":12,"ts":"2027-01-15T08:00:00.250Z","object":{"track_id":3,"label":"person","class_id":0,'
        b'"confidence":0.9,"bbox":[1.0,2.0,3.0,4.0]},"zone":"path"}'
    )
    assert item.topic == b"vigild.door.zone.enter"
