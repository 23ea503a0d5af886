"""The journal's files against other users and hostile paths (issue 29, point 5): owner-only modes from creation,
SQLite URIs that survive `#` and `?` in a path, and a start-up sweep that removes only what the journal wrote and
follows no symbolic link."""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_endpoint
from test_journal import make_records

from vigild.config.settings import PublisherConfig
from vigild.events import Event
from vigild.outputs.bus import EventBus
from vigild.outputs.journal import Journal, JournalWriter, Query, default_path, open_read_only, select
from vigild.outputs.publisher import Publisher
from vigild.outputs.replay import ReplayServer


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)  # what every shell has: files 0644, directories 0755 unless vigild says otherwise
    yield
    os.umask(previous)


def test_journal_files_are_owner_only_from_their_creation(tmp_path, umask_022):
    path = tmp_path / "made" / "journal.db"
    journal = Journal(path)
    journal.write(make_records(4, jpeg_every=1))
    files = ["journal.db", "journal.db-wal", "journal.db-shm", "journal.db.lock"]
    assert {name: mode(path.parent / name) for name in files} == dict.fromkeys(files, 0o600)
    assert mode(path.parent) == mode(journal.snapshots) == 0o700
    assert {mode(file) for file in journal.snapshots.iterdir()} == {0o600}
    journal.close()


def test_files_a_former_run_left_wider_are_tightened(tmp_path, umask_022):
    path = tmp_path / "journal.db"
    Journal(path).close()
    for name in ("journal.db", "journal.db-wal", "journal.db-shm", "journal.db.lock"):
        (tmp_path / name).touch()
        (tmp_path / name).chmod(0o644)
    (tmp_path / "snapshots").chmod(0o755)
    Journal(path).close()
    assert mode(tmp_path / "journal.db") == mode(tmp_path / "journal.db.lock") == 0o600
    assert mode(tmp_path / "snapshots") == 0o700


def test_under_the_unit_the_group_reads_the_journal(tmp_path, monkeypatch):
    """$STATE_DIRECTORY set (the installed unit, UMask=0027): 0640 files and 0750 directories, for the vigild group."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    previous = os.umask(0o027)
    try:
        journal = Journal(default_path(None))
        journal.write(make_records(2, jpeg_every=1))
        assert mode(tmp_path / "journal.db") == mode(tmp_path / "journal.db-wal") == 0o640
        assert mode(tmp_path / "snapshots") == 0o750
        journal.close()
    finally:
        os.umask(previous)


@pytest.mark.parametrize("name", ["cams#2", "what?mode=rw&x", "100%25 sure"])
def test_a_journal_path_with_uri_characters_is_read_read_only(tmp_path, name):
    path = tmp_path / name / "journal.db"
    journal = Journal(path)
    records = make_records(5)
    journal.write(records)
    db = open_read_only(path)
    assert [e["seq"] for e in select(db, Query())] == [r.seq for r in records]
    with pytest.raises(Exception, match="readonly"):  # mode=ro held: the `?` in the path did not drop it
        db.execute("DELETE FROM events")
    db.close()
    journal.close()


def test_vigild_events_and_replay_read_the_journal_of_a_config_named_with_a_hash(tmp_path):
    """`cams#2.yaml`: its default journal is in a directory named after it; `vigild events --config` reads it, and
    the replay socket serves it to a resuming subscriber."""
    from vigild.client import Subscriber

    config = tmp_path / "cams#2.yaml"
    config.write_text(f"publisher:\n  endpoint: {free_endpoint()}\n")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    path = default_path(config, env)
    assert "cams#2-" in str(path)
    journal = Journal(path)
    records = make_records(6)
    journal.write(records)
    journal.close()
    done = subprocess.run([sys.executable, "-m", "vigild", "events", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["seq"] for line in done.stdout.splitlines()] == [r.seq for r in records]

    publisher = Publisher(PublisherConfig(endpoint=free_endpoint(), heartbeat_interval=0.2))
    bus = EventBus()
    bus.attach(publisher)
    publisher.start()
    writer = JournalWriter(Journal(path))
    bus.continue_from(writer.through)
    bus.attach(writer)
    writer.start()
    replay_endpoint = f"ipc://{tmp_path}/replay"
    replay = ReplayServer(replay_endpoint, writer, bus)
    replay.start()
    try:
        with Subscriber(publisher.config.endpoint, resume=True, after_seq=0, replay_endpoint=replay_endpoint) as sub:
            got: list[int] = []
            deadline = time.monotonic() + 60
            bus.publish(Event("zone.enter", "door", time.time(), 0))  # live: the subscriber sees seq 7
            while len(got) < 7 and time.monotonic() < deadline:
                message = sub.receive(timeout=0.5)
                if message is not None and message.event.get("type") != "heartbeat":
                    got.append(message.event["seq"])
            assert got[:6] == [r.seq for r in records], got  # from the journal, through its quoted URI
            assert sub.missed == 0
    finally:
        replay.stop()
        publisher.stop()
        writer.stop()


def test_the_sweep_removes_only_names_the_journal_writes(tmp_path):
    path = tmp_path / "journal.db"
    Journal(path).close()
    snapshots = tmp_path / "snapshots"
    foreign = ["notes.txt", "holiday.jpg", "12-notanid.jpg", f"7-{'A' * 32}.jpg", f"x7-{'a' * 32}.jpg"]
    for name in foreign:
        (snapshots / name).write_text("mine")
    (snapshots / "album").mkdir()
    outside = tmp_path / "outside.jpg"
    outside.write_text("elsewhere")
    (snapshots / f"8-{'b' * 32}.jpg").symlink_to(outside)  # named like ours, a link: not followed, not removed
    (snapshots / f"9-{'c' * 32}.jpg").write_bytes(b"left by a killed run")
    journal = Journal(path)
    assert journal.swept == 1
    journal.close()
    assert sorted(p.name for p in snapshots.iterdir()) == sorted([*foreign, "album", f"8-{'b' * 32}.jpg"])
    assert outside.read_text() == "elsewhere"


def test_a_symlinked_snapshots_directory_or_lock_file_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    precious = elsewhere / f"1-{'a' * 32}.jpg"
    precious.write_text("not the journal's")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "snapshots").symlink_to(elsewhere)
    with pytest.raises(OSError, match=r"snapshots is a symbolic link.*journal\.path"):
        Journal(shared / "journal.db")
    assert precious.read_text() == "not the journal's" and not (shared / "journal.db").exists()

    (shared / "snapshots").unlink()
    (shared / "snapshots").write_text("a file")
    with pytest.raises(OSError, match="snapshots is not a directory"):
        Journal(shared / "journal.db")

    locked = tmp_path / "locked"
    locked.mkdir()
    target = elsewhere / "target"
    target.write_text("keep")
    (locked / "journal.db.lock").symlink_to(target)
    with pytest.raises(OSError, match=r"journal\.db\.lock is a symbolic link"):
        Journal(locked / "journal.db")
    assert target.read_text() == "keep"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give the snapshots directory to another user")
def test_a_snapshots_directory_of_another_user_is_refused(tmp_path):
    nobody = pwd.getpwnam("nobody")
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / f"1-{'a' * 32}.jpg").write_text("theirs")
    os.chown(tmp_path / "snapshots", nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(OSError, match="belongs to another user"):
        Journal(tmp_path / "journal.db")
    assert (tmp_path / "snapshots" / f"1-{'a' * 32}.jpg").read_text() == "theirs"
