"""The event journal as a user meets it: `vigild run` keeps every event, subscribers in other processes resume
without losing one, `vigild events` reads the history, and a killed daemon, a full disk, retention and a second
daemon on the same journal all behave as docs/events.md says."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, VTEST, daemon_env, fill, free_endpoint, journal_record, vigild, yolo_fastest_yaml

from vigild.outputs.journal import Journal

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent
ANALYTICS = """\
  - type: bytetrack
  - type: analytics
    min_frames: 3
    loiter_s: null
    snapshot: crop"""
GEOMETRY = """\
    lines:
      crossing: {points: [[250, 120], [250, 576]]}
    zones:
      path: {points: [[0, 0.31], [1, 0.21], [1, 0.73], [0, 0.73]], normalized: true}"""


def write_config(tmp_path: Path, cameras: int, journal: str, publisher: str = "", loop: bool = True,
                 plugins: bool = True) -> tuple[Path, str, str]:  # fmt: skip
    """A config of `cameras` vtest.avi cameras (as fast as the chain goes) with the detector, ByteTrack and the
    analytics; returns it, the publisher's endpoint and the replay socket's."""
    endpoint, replay = free_endpoint(), f"ipc://{tmp_path}/replay"
    camera_list = "".join(
        f"  cam{i}:\n    source: {VTEST}\n    realtime: false\n    loop: {str(loop).lower()}\n{GEOMETRY}\n"
        for i in range(cameras)
    )
    chain = f"plugins:\n{yolo_fastest_yaml(0.3)}\n{ANALYTICS}\n" if plugins else ""
    config = tmp_path / "vigild.yaml"
    config.write_text(
        f"cameras:\n{camera_list}{chain}publisher:\n  endpoint: {endpoint}\n  heartbeat_interval: 0.5\n{publisher}"
        f"journal:\n  replay_endpoint: {replay}\n{journal}control:\n  endpoint: ipc://{tmp_path}/control\n"
        "device: cpu\n"
    )
    return config, endpoint, replay


def rows(path: Path, where: str = "") -> list[tuple]:
    """(seq, id, run, snapshot) of the journal's rows, read as `vigild events` reads it."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(f"SELECT seq, id, run, snapshot FROM events {where} ORDER BY seq").fetchall()
    finally:
        db.close()


def wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def count_rows(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        return len(rows(path))
    except sqlite3.Error:
        return 0  # not made yet


def lines_of(path: Path) -> list[dict]:
    """The JSON lines a subscriber wrote (a line cut short by a SIGKILL is not one)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def events_of(records: list[dict]) -> list[dict]:
    """Events (not gap notices) from resume_subscriber.py's lines (`{"event": ...}`) or `vigild sub`'s (bare)."""
    bodies = [r.get("event", r) for r in records]
    return [b for b in bodies if b.get("type") not in ("gap", "heartbeat")]


def resume_subscriber(endpoint: str, replay: str, out: Path, after: int, idle: float, *slow: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE / "resume_subscriber.py"), endpoint, replay, str(out), str(after), str(idle), *slow],
        env=daemon_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def heartbeat(endpoint: str) -> dict:
    """One heartbeat, as `vigild sub` prints it."""
    result = subprocess.run(
        [sys.executable, "-m", "vigild", "sub", "-e", endpoint, "-n", "1", "-t", "60", "vigild.sys.heartbeat"],
        capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stop(daemon: subprocess.Popen, timeout: float = 60) -> int:
    daemon.send_signal(signal.SIGTERM)
    return daemon.wait(timeout)


def test_killed_resumed_and_slow_subscribers_end_with_exactly_the_journals_events(tmp_path):
    """`vigild run` with 2 cameras and the analytics. Four subscribers in other processes, all resuming from seq 0:
    A never leaves; B (`vigild sub --resume`) is killed mid-stream for 10 s and restarted after the last seq it
    printed; C has a receive high-water mark of 2 and stalls for 2 s every 40 events while the publisher's
    high-water mark is 5, so ZeroMQ drops much of the live stream for it; D is `vigild events --config --follow`.
    Each ends with the same events, by seq and id, as the journal holds: every seq once, in order, no gap."""
    journal = tmp_path / "journal.db"
    config, endpoint, replay = write_config(tmp_path, 2, f"  path: {journal}\n", publisher="  hwm: 5\n")
    daemon = vigild("run", "--config", str(config), "--log-level", "WARNING", env=daemon_env())
    a_out, b_out, c_out, d_out = (tmp_path / f"{name}.jsonl" for name in "abcd")
    b_command = [sys.executable, "-m", "vigild", "sub", "-e", endpoint, "--resume", "--replay-endpoint", replay,
                 "--timeout", "8"]  # fmt: skip
    started = []
    try:
        a = resume_subscriber(endpoint, replay, a_out, 0, 8)
        c = resume_subscriber(endpoint, replay, c_out, 0, 8, "2", "40", "2")
        b = subprocess.Popen([*b_command, "--after-seq", "0"], stdout=b_out.open("w"), env=daemon_env(), cwd=ROOT)
        started = [a, b, c]
        wait_for(lambda: len(events_of(lines_of(b_out))) >= 40, "B has 40 events")
        # SIGINT as at a terminal, even where this test runs with it ignored (a background job of a script: then
        # Python in the child would install no KeyboardInterrupt handler and Ctrl-C could not stop it)
        d = subprocess.Popen([sys.executable, "-m", "vigild", "events", "--config", str(config), "--follow"],
                             stdout=d_out.open("w"), env=daemon_env(), cwd=ROOT,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
        started.append(d)
        b.kill()
        b.wait()
        time.sleep(10)
        b_seen = events_of(lines_of(b_out))
        resumed_after = b_seen[-1]["seq"]
        at_restart = max(e["seq"] for e in events_of(lines_of(a_out)))
        b2 = subprocess.Popen([*b_command, "--after-seq", str(resumed_after)], stdout=b_out.open("a"),
                              env=daemon_env(), cwd=ROOT)  # fmt: skip
        started.append(b2)
        target = at_restart + 60
        for out in (a_out, b_out, c_out, d_out):
            wait_for(lambda out=out: max((e["seq"] for e in events_of(lines_of(out))), default=0) >= target,
                     f"{out.name} past seq {target}")  # fmt: skip
        assert stop(daemon) == 0
        for process in (a, b2, c):
            assert process.wait(120) == 0
        d.send_signal(signal.SIGINT)
        d.wait(30)
    finally:
        for process in [daemon, *started]:
            if process.poll() is None:
                process.kill()
    truth = [(seq, event_id) for seq, event_id, _, _ in rows(journal)]
    assert [seq for seq, _ in truth] == list(range(1, len(truth) + 1)), "the journal has every seq"
    assert c.stdout is not None and json.loads(c.stdout.read().splitlines()[-1])["replayed"] > 0, "C fell behind"
    for name, out in (("A", a_out), ("B", b_out), ("C", c_out), ("D", d_out)):
        records = lines_of(out)
        got = [(e["seq"], e["id"]) for e in events_of(records)]
        assert [x for x in got if x[0] <= target] == truth[:target], f"{name}: every event once, in order, as journaled"
        assert [x for x in got if x[0] > target] == [x for x in truth[target:] if x in set(got)], name
        # after `target` the daemon was stopped: what a subscriber could not fill any more is said, not hidden
        gaps = [r.get("event", r) for r in records if r.get("event", r).get("type") == "gap"]
        assert all(gap["first"] > target and gap["reason"] == "no_replay" for gap in gaps), (name, gaps)
    b_events = events_of(lines_of(b_out))
    assert b_events[len(b_seen) - 1]["seq"] == resumed_after and b_events[len(b_seen)]["seq"] == resumed_after + 1


def test_a_daemon_killed_mid_run_leaves_a_clean_journal_and_the_next_run_goes_on_from_its_last_seq(tmp_path):
    journal = tmp_path / "state" / "journal.db"
    config, _, _ = write_config(tmp_path, 1, f"  path: {journal}\n")
    first = vigild("run", "--config", str(config), "--log-level", "WARNING", env=daemon_env())
    try:
        wait_for(lambda: sum(1 for row in rows_or_empty(journal) if row[3]) >= 5, "5 events with snapshots stored")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    before = rows(journal)
    assert [row[0] for row in before] == list(range(1, len(before) + 1)) and len({row[2] for row in before}) == 1
    for _, _, _, snapshot in before:  # every row's snapshot is whole on disk
        assert snapshot is None or (journal.parent / "snapshots" / snapshot).stat().st_size > 0
    second = vigild("run", "--config", str(config), "--log-level", "WARNING", env=daemon_env())
    try:
        wait_for(lambda: len(rows_or_empty(journal)) >= len(before) + 5, "the second run stores 5 events")
        assert stop(second) == 0
    finally:
        if second.poll() is None:
            second.kill()
    after = rows(journal)
    assert after[: len(before)] == before, "the first run's events are as they were"
    runs = [row[2] for row in after]
    assert len(set(runs)) == 2 and runs[len(before)] != runs[0]
    assert [row[0] for row in after] == list(range(1, len(after) + 1)), "seq goes on from the last stored"
    files = {file.name for file in (journal.parent / "snapshots").iterdir()}
    assert files == {row[3] for row in after if row[3] is not None}, "no orphan snapshot, none missing"
    history = subprocess.run(
        [sys.executable, "-m", "vigild", "events", "--config", str(config), "--format", "json"],
        capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert history.returncode == 0, history.stderr
    assert [(e["seq"], e["id"], e["run"]) for e in map(json.loads, history.stdout.splitlines())] == [
        row[:3] for row in after
    ]


def rows_or_empty(path: Path) -> list[tuple]:
    try:
        return rows(path) if path.exists() else []
    except sqlite3.Error:
        return []


def test_retention_at_start_and_a_second_daemon_on_the_same_journal_is_refused(tmp_path):
    """A journal holding 40 events from 40 days ago and 60 recent ones of 30 KB snapshots each: a daemon with 30
    days' retention and a 1 MB cap removes the old ones and then the oldest recent ones (rows and files) as it
    starts. A second daemon on the same journal exits 2, naming journal.path and the first daemon's pid."""
    journal_path = tmp_path / "journal.db"
    journal = Journal(journal_path)
    now = time.time()
    records = []
    for seq in range(1, 101):
        ts = now - (40 * 86400 if seq <= 40 else 3600 - seq)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".000Z"
        body = {"schema": 1, "seq": seq, "id": f"{seq:032x}", "run": "1" * 32, "type": "zone.enter",
                "camera": "cam0", "frame": seq, "ts": stamp}  # fmt: skip
        records.append(journal_record(body, os.urandom(30_000)))
    journal.write(records)
    journal.close()
    config, endpoint, _ = write_config(
        tmp_path, 1, f"  path: {journal_path}\n  retention_days: 30\n  max_size_mb: 1\n", plugins=False
    )
    daemon = vigild("run", "--config", str(config), "--log-level", "WARNING", env=daemon_env())
    try:
        wait_for(lambda: len([r for r in rows_or_empty(journal_path) if r[0] <= 100]) < 60, "retention ran")
        old = rows(journal_path, "WHERE seq <= 100")
        assert old and old[0][0] > 40, "every old event went, and the oldest recent ones"
        assert [row[0] for row in old] == list(range(old[0][0], 101)), "the newest are kept"
        files = {file.name for file in (tmp_path / "snapshots").iterdir()}
        assert files == {row[3] for row in rows(journal_path) if row[3] is not None}
        assert sum(row[3] is not None for row in old) * 30_000 <= 1 << 20
        second_config = tmp_path / "second.yaml"
        second_config.write_text(
            config.read_text()
            .replace(endpoint, free_endpoint())
            .replace(f"ipc://{tmp_path}/replay", f"ipc://{tmp_path}/replay2")
            .replace(f"ipc://{tmp_path}/control", f"ipc://{tmp_path}/control2")
        )
        second = subprocess.run(
            [sys.executable, "-m", "vigild", "run", "--config", str(second_config)],
            capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr
        assert f"journal.path: the event journal {journal_path} is in use by another vigild (pid {daemon.pid})" in (
            second.stderr
        )
        assert daemon.poll() is None, "the first daemon runs on"
        assert stop(daemon) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert [row[0] for row in rows(journal_path)][-1] > 100, "the first daemon went on from seq 100"


def heartbeats_of(records: list[dict]) -> list[dict]:
    return [r["event"] for r in records if r["event"].get("type") == "heartbeat"]


def test_a_full_disk_costs_only_the_journal_and_resuming_subscribers_are_told_exactly_what_is_missing(
    tmp_path, small_disk, subscriber_factory
):
    """The journal on a 1 MiB tmpfs the test mounts and then fills. One clear error in the log and the heartbeat,
    live events flow on, journaling resumes by itself once the test frees the space (and grows the tmpfs), the counters agree with the
    rows, and a subscriber resuming from seq 0 gets a gap notice for exactly the seqs the journal lacks."""
    journal = small_disk / "journal.db"
    config, endpoint, replay = write_config(tmp_path, 1, f"  path: {journal}\n")
    live = subscriber_factory(endpoint, idle_s=10)
    log_file = tmp_path / "daemon.log"
    daemon = vigild("run", "--config", str(config), env=daemon_env(), stderr=log_file.open("w"))
    try:
        wait_for(lambda: len(rows_or_empty(journal)) >= 5, "5 events stored")
        fill(small_disk)
        wait_for(lambda: any(b["journal"]["error"] and b["journal"]["not_journaled"] >= 3
                             for b in heartbeats_of(live.messages())), "the heartbeat says events are not journaled")  # fmt: skip
        full_at = max(b["publisher"]["last_seq"] for b in heartbeats_of(live.messages()))
        wait_for(lambda: max(m["event"].get("seq", 0) for m in live.messages() if m["event"]["type"] != "heartbeat")
                 > full_at + 5, "live events go on while the disk is full")  # fmt: skip
        (small_disk / "filler").unlink()  # space returns, and more: 1 MiB would fill again with crops before the end
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
        wait_for(lambda: (b := heartbeats_of(live.messages())[-1])["journal"]["error"] is None
                 and b["journal"]["stored"] > 5, "journaling resumes by itself")  # fmt: skip
        end = heartbeats_of(live.messages())[-1]["publisher"]["last_seq"] + 5
        wait_for(lambda: len(rows_or_empty(journal)) and rows(journal)[-1][0] >= end, f"seq {end} stored")
        resumed = tmp_path / "resumed.jsonl"
        subscriber = resume_subscriber(endpoint, replay, resumed, 0, 8)
        wait_for(lambda: max((r["event"].get("seq", r["event"].get("last") or 0) for r in lines_of(resumed)),
                             default=0) >= end, "the resuming subscriber is past the outage")  # fmt: skip
        last_beat = heartbeats_of(live.messages())[-1]
        assert stop(daemon) == 0
        subscriber.wait(60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    log = log_file.read_text()
    stored = [row[0] for row in rows(journal)]
    missing = sorted(set(range(1, stored[-1] + 1)) - set(stored))
    assert missing, "the full disk cost the journal some events"
    assert log.count("cannot write the event journal") == 1, log
    assert "No space left on device" in log or "database or disk is full" in log
    assert "is written again" in log
    counted = last_beat["journal"]
    upto = last_beat["publisher"]["last_seq"]
    assert counted["not_journaled"] == len([seq for seq in missing if seq <= upto])
    # stored by then: at most what was stamped and not lost, at least what the journal held before the outage
    assert len([seq for seq in stored if seq <= full_at]) <= counted["stored"] <= upto - counted["not_journaled"]
    notices = [r["event"] for r in lines_of(resumed) if r["event"]["type"] == "gap" and r["event"]["first"] <= end]
    told = sorted(seq for gap in notices for seq in range(gap["first"], gap["last"] + 1))
    assert told == [seq for seq in missing if seq <= end] and {g["reason"] for g in notices} == {"not_journaled"}
    got = [r["event"]["seq"] for r in lines_of(resumed) if r["event"]["type"] != "gap" and r["event"]["seq"] <= end]
    assert got == [seq for seq in stored if seq <= end], "every journaled event once, in order"


def test_members_of_the_services_group_can_read_a_running_daemons_journal_and_others_cannot(tmp_path):
    """As the unit runs it (UMask=0027, StateDirectoryMode=0750): the journal's files are the group's to read.
    `vigild events` as another user of that group reads it while the daemon writes (SQLite's WAL read with a
    read-only -shm); a user outside the group cannot. The group here is `daemon`, standing in for `vigild`."""
    import grp
    import shutil
    import tempfile

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    base = Path(tempfile.mkdtemp(prefix="vigild-group-"))
    try:
        base.chmod(0o755)  # as /var/lib is: anyone may pass through to the 0750 state directory
        state = base / "vigild"
        config, _, _ = write_config(tmp_path, 1, "", plugins=False)
        config.write_text(config.read_text().replace(f"source: {VTEST}", "source: test://balls?fps=10"))
        daemon = vigild("run", "--config", str(config), "--log-level", "WARNING",
                        env=daemon_env(STATE_DIRECTORY=str(state)), preexec_fn=lambda: os.umask(0o027))  # fmt: skip
        journal = state / "journal.db"
        try:
            wait_for(lambda: len(rows_or_empty(journal)) >= 1, "the first event stored")
            state.chmod(0o750)  # (systemd's StateDirectoryMode=0750; here the daemon made it under our umask)
            group = grp.getgrnam("daemon").gr_gid
            for path in [state, *state.rglob("*")]:
                os.chown(path, 0, group)
            modes = {path.name: path.stat().st_mode & 0o777 for path in state.iterdir()}
            assert modes["journal.db"] == 0o640 and modes["snapshots"] == 0o750, modes

            def as_user(gid: str) -> subprocess.CompletedProcess:
                return subprocess.run(
                    ["setpriv", "--reuid=nobody", f"--regid={gid}", "--clear-groups", sys.executable, "-m", "vigild",
                     "events", "--journal", str(journal)],
                    capture_output=True, text=True, env=daemon_env(), cwd=ROOT, timeout=60,
                )  # fmt: skip

            member = as_user("daemon")
            assert member.returncode == 0, member.stderr
            assert [json.loads(line)["seq"] for line in member.stdout.splitlines()][:1] == [1]
            outsider = as_user("nogroup")
            assert outsider.returncode == 2 and "cannot read the event journal" in outsider.stderr, outsider.stderr
            assert stop(daemon) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_line_crossings_per_direction_in_a_time_window_from_the_plaza_configs_journal():
    """configs/plaza-analytics.yaml as shipped (vtest.avi as fast as the chain goes), its journal where a user's
    daemon keeps it (the XDG state directory), and `vigild events --config` on the same file: the crossings per
    direction are the ones counted by hand on this footage (12 in, 7 out; the tracker may miss or split a few:
    test_analytics.py's range), and a time window splits them without losing or doubling one."""
    env = daemon_env(VIGILD_REALTIME="false", VIGILD_PUB=free_endpoint())
    config = "configs/plaza-analytics.yaml"
    daemon = vigild("run", "--config", config, "--log-level", "WARNING", env=env)
    assert daemon.wait(600) == 0, "the daemon ends with its file"

    def events(*args: str) -> list[dict]:
        result = subprocess.run([sys.executable, "-m", "vigild", "events", "--config", config, *args],
                                capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    counts = {row["direction"]: row["count"] for row in events("--type", "line.cross", "--count-by", "direction")}
    assert 8 <= counts.get("in", 0) <= 16 and 4 <= counts.get("out", 0) <= 12, counts
    crossings = events("--type", "line.cross")
    assert len(crossings) == sum(counts.values()) and {e["camera"] for e in crossings} == {"plaza"}
    middle = crossings[len(crossings) // 2]["ts"]
    before = events("--type", "line.cross", "--until", middle, "--count-by", "direction")
    after = events("--type", "line.cross", "--since", middle, "--count-by", "direction")
    for direction, count in counts.items():
        split = [row["count"] for rows_ in (before, after) for row in rows_ if row["direction"] == direction]
        assert sum(split) == count
    assert sum(row["count"] for row in after) == len(crossings) - len(crossings) // 2
    assert events("--type", "line.cross", "--since", "0s") == [], "nothing after the run"


def test_a_journal_that_cannot_be_opened_is_one_clear_error_and_the_daemon_publishes_on(tmp_path, subscriber_factory):
    """`journal.path` under a regular file (no directory can be made there, whoever runs it): the daemon starts,
    logs the error once, says it in the heartbeat, and publishes every event live, counted as not journaled."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config, endpoint, _ = write_config(tmp_path, 1, f"  path: {blocker}/journal.db\n", plugins=False)
    config.write_text(config.read_text().replace(f"source: {VTEST}", "source: test://balls?fps=10"))
    live = subscriber_factory(endpoint, idle_s=10)
    log_file = tmp_path / "daemon.log"
    daemon = vigild("run", "--config", str(config), env=daemon_env(), stderr=log_file.open("w"))
    try:
        messages = live.wait_for(lambda ms: len(heartbeats_of(ms)) >= 3, timeout=120)
        assert stop(daemon) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    beat = heartbeats_of(messages)[-1]
    assert beat["journal"]["error"] and "not-a-directory" in beat["journal"]["error"]
    assert beat["journal"]["not_journaled"] == beat["publisher"]["last_seq"] >= 1  # camera.up at least
    log = log_file.read_text()
    assert log.count("cannot open the event journal") == 1 and "not journaled this run" in log
