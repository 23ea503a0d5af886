"""Daemons sharing cameras through NATS JetStream leases, and the NATS output (docs/cluster.md).

A real `nats-server` (Debian's, with JetStream) and real daemons, each in a network namespace of its own joined to a
bridge the test makes (tests/netns.py; loopback where namespaces cannot be made, and the test says so). The daemons
run test:// cameras and the `frame_echo` test plugin (one event per frame, no model: on two cores the lease renewals
are not starved by inference). What the tests know for sure comes from the daemons' journals (every event each one
made) and from the stream itself, read back message by message with its headers.
"""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, daemon_env
from nats_server import NatsServer, connect, run, stream_messages
from netns import Network, available
from service import plugin_site

from vigild.client import ControlClient

pytestmark = pytest.mark.e2e

CAMERAS = [f"c{i}" for i in range(1, 7)]
TTL = 8.0
STREAM = "VIGILD"


def wait_until(condition, what: str, timeout: float, poll: float = 0.2) -> float:
    """Seconds it took `condition()` to hold; AssertionError naming `what` after `timeout`."""
    began = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - began
        assert time.monotonic() - began < timeout, f"never: {what} (within {timeout:g} s)"
        time.sleep(poll)


class Member:
    """One daemon of the cluster: its config, its namespace, its process."""

    def __init__(self, directory: Path, index: int, nats_url: str, name: str, site: Path, network: Network | None,
                 capacity: int = 64, extra: str = "", cameras: list[str] = CAMERAS, login: str = ""):  # fmt: skip
        self.directory = directory / f"d{index}"
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.index = index
        self.name = name
        self.network = network
        self.namespace = network.add()[0] if network is not None else None
        self.site = site
        self.cameras = cameras
        listed = "".join(f"  {c}: {{source: 'test://?width=96&height=64&fps=2'}}\n" for c in cameras)
        self.config = self.directory / "vigild.yaml"
        self.config.write_text(
            f"cameras:\n{listed}plugins:\n  - type: frame_echo\n"
            f"publisher: {{endpoint: 'tcp://127.0.0.1:0', heartbeat_interval: 1}}\n"
            f"control: {{endpoint: 'ipc://{self.directory}/control'}}\n"
            f"journal: {{path: '{self.directory}/journal.db', replay_endpoint: 'ipc://{self.directory}/replay'}}\n"
            f"cluster: {{nats: '{nats_url}', name: {name}, lease_ttl_s: {TTL}, capacity: {capacity}{login}}}\n"
            f"outputs:\n  - {{type: nats, stream: {STREAM}}}\n"
            f"torch_threads: 1\nlog_level: INFO\n{extra}"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Member:
        env = daemon_env(PYTHONPATH=f"{self.site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        argv = [sys.executable, "-m", "vigild", "run", "--config", str(self.config)]
        if self.network is not None:
            argv = self.network.command(self.namespace, argv)
        log = (self.directory / "daemon.log").open("ab")
        self.process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        return self

    def status(self) -> dict[str, Any] | None:
        try:
            with ControlClient(f"ipc://{self.directory}/control", timeout=3) as client:
                reply, _ = client.request("status")
        except TimeoutError:
            return None
        return reply.get("result") if reply.get("ok") else None

    def cluster(self) -> dict[str, Any]:
        status = self.status()
        return status["cluster"] if status is not None else {}

    def held(self) -> set[str]:
        return set(self.cluster().get("held", []))

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return (self.directory / "daemon.log").read_text(errors="replace")

    def journal(self) -> list[tuple[str, str, float, str]]:
        """(id, camera, ts, run) of every event this daemon journaled."""
        db = sqlite3.connect(f"file:{self.directory}/journal.db?mode=ro", uri=True)
        try:
            return db.execute("SELECT id, camera, ts, run FROM events ORDER BY seq").fetchall()
        finally:
            db.close()


@pytest.fixture
def network():
    reason = available()
    if reason is not None:
        print(f"network namespaces cannot be made here ({reason}): the daemons run on loopback")
        yield None
        return
    made = Network()
    try:
        yield made
    finally:
        made.close()


def holders_by_camera(members: list[Member]) -> dict[str, list[int]]:
    held: dict[str, list[int]] = defaultdict(list)
    for member in members:
        for camera in member.held():
            held[camera].append(member.index)
    return held


def one_holder_each(members: list[Member], counts: list[int] | None = None) -> bool:
    held = holders_by_camera(members)
    if sorted(held) != CAMERAS or any(len(h) != 1 for h in held.values()):
        return False
    return counts is None or sorted(len(m.held()) for m in members) == sorted(counts)


def runs_by_camera(messages: list[dict[str, Any]]) -> dict[str, list[tuple[str, float, float, int]]]:
    """Per camera, its events in `ts` order cut into runs of one publisher (member and run, from the headers):
    (publisher, first ts, last ts, events)."""
    from datetime import datetime

    by_camera: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for message in messages:
        body = message["body"]
        if "camera" not in body:
            continue
        ts = datetime.fromisoformat(body["ts"].replace("Z", "+00:00")).timestamp()
        publisher = f"{message['headers']['Vigild-Member']}/{message['headers']['Vigild-Run']}"
        by_camera[body["camera"]].append((ts, publisher))
    runs: dict[str, list[tuple[str, float, float, int]]] = {}
    for camera, events in by_camera.items():
        events.sort()
        cut: list[tuple[str, float, float, int]] = []
        for ts, publisher in events:
            if cut and cut[-1][0] == publisher:
                who, first, _, count = cut[-1]
                cut[-1] = (who, first, ts, count + 1)
            else:
                cut.append((publisher, ts, ts, 1))
        runs[camera] = cut
    return runs


def test_daemons_share_the_cameras_hand_them_over_and_never_publish_one_camera_at_once(tmp_path, network):
    host = network.host if network is not None else "127.0.0.1"
    server = NatsServer(tmp_path / "nats", host=host).start()
    try:
        check_cluster(tmp_path, network, server)
    finally:
        server.stop()


def check_cluster(tmp_path: Path, network: Network | None, server: NatsServer) -> None:
    site = plugin_site(tmp_path)
    members: list[Member] = []
    try:
        # two of them share a name, as identical replicas of one Deployment do: they are two members
        for index, name in ((1, "replica"), (2, "replica"), (3, "other")):
            members.append(Member(tmp_path, index, server.url, name, site, network).start())
        d1, d2, d3 = members
        wait_until(lambda: one_holder_each(members, [2, 2, 2]), "6 cameras held 2 by each of 3 daemons", 90)
        wait_until(lambda: all(len(m.cluster().get("members", [])) == 3 for m in members), "3 members seen", 30)

        def states_agree(member: Member) -> bool:
            """What it streams is what it holds; the rest is `elsewhere` (not `down`), held by the one that does."""
            status = member.status() or {"cameras": {}, "cluster": {}}
            states = {name: camera["state"] for name, camera in status["cameras"].items()}
            held = set(status["cluster"].get("held", []))
            return ({c for c, s in states.items() if s == "streaming"} == held
                    and {c for c, s in states.items() if s == "elsewhere"} == set(CAMERAS) - held)  # fmt: skip

        wait_until(lambda: all(states_agree(m) for m in members), "camera states agree with the leases", 30)
        # the output and the placement share one connection: one per daemon (each its own address in its namespace)
        vigild = [c for c in server.connections() if str(c.get("name", "")).startswith("vigild ")]
        assert len(vigild) == 3, vigild
        if network is not None:
            assert len({c["ip"] for c in vigild}) == 3, vigild
        env = daemon_env()
        shown = subprocess.run([sys.executable, "-m", "vigild", "cluster", "status", "--json", "-c", str(d1.config)],
                               env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        import json

        report = json.loads(shown.stdout)
        assert len(report["members"]) == 3 and sorted(report["leases"]) == CAMERAS and not report["unassigned"]
        ready = subprocess.run([sys.executable, "-m", "vigild", "cluster", "ready", "-c", str(d1.config)], env=env,
                               cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert ready.returncode == 0, ready.stderr

        # SIGKILL: its cameras are taken over once its leases expire
        killed = d3.held()
        d3.signal(signal.SIGKILL)
        d3.process.wait()  # type: ignore[union-attr]
        took = wait_until(lambda: one_holder_each([d1, d2], [3, 3]), "the killed daemon's cameras taken over",
                          TTL * 3)  # fmt: skip
        print(f"takeover after SIGKILL: {took:.1f} s (lease TTL {TTL:g} s)")

        # a fourth daemon joins and takes its share
        d4 = Member(tmp_path, 4, server.url, "late", site, network).start()
        members.append(d4)
        wait_until(lambda: one_holder_each([d1, d2, d4], [2, 2, 2]), "the fourth daemon takes its share", 90)

        # graceful stop: the leases are released at once, not left to expire
        leaving = d2.held()
        d2.stop()
        handed = wait_until(lambda: one_holder_each([d1, d4], [3, 3]), "a stopped daemon's cameras taken over",
                            TTL * 3, poll=0.05)  # fmt: skip
        print(f"takeover after a graceful stop: {handed:.2f} s (seen through the status)")

        # SIGSTOP past the TTL: the others take its cameras; once continued it publishes nothing in their periods
        wait_until(lambda: all(states_agree(m) for m in (d1, d4)), "the hand-over's cameras streaming", 30)
        time.sleep(2)  # their events reach the stream (the hand-over's gap is measured from them below)
        frozen = d1.held()
        d1.signal(signal.SIGSTOP)
        wait_until(lambda: one_holder_each([d4], [6]), "the paused daemon's cameras taken over", TTL * 3)
        d1.signal(signal.SIGCONT)
        wait_until(lambda: one_holder_each([d1, d4], [3, 3]), "the continued daemon back with its share", 60)
        assert d1.cluster()["lost"] >= len(frozen)

        # the NATS server restarts under the daemons; the killed daemon comes back and catches up from its journal
        server.stop()
        time.sleep(2)
        server.start()
        d3 = Member(tmp_path, 3, server.url, "other", site, network)  # the same directory: its journal
        members[2] = d3.start()
        wait_until(lambda: one_holder_each([d1, d3, d4], [2, 2, 2]), "three daemons again after the restart", 120)
        wait_until(lambda: all((m.status() or {}).get("outputs", {}).get("nats", {}).get("connected") for m in
                               (d1, d3, d4)), "the outputs connected again", 60)  # fmt: skip
        time.sleep(2)
    finally:
        for member in members:
            member.stop()
        logs = {m.index: m.log() for m in members}

    for index, text in logs.items():
        assert "Traceback" not in text, f"daemon {index}:\n{text[-3000:]}"
    messages = stream_messages(server.url, STREAM)

    # one consumer sees every camera; every event every daemon journaled is in the stream, each once
    ids = [m["headers"]["Nats-Msg-Id"] for m in messages if "camera" in m["body"]]
    assert {m["body"]["camera"] for m in messages if m["body"].get("type") == "frame"} == set(CAMERAS)
    journaled = {row[0] for member in (d1, d2, d3, d4) for row in member.journal()}
    assert journaled <= set(ids), f"{len(journaled - set(ids))} journaled events missing from the stream"
    assert len(ids) == len(set(ids)), "an event twice in the stream (within the duplicate window)"
    assert all(m["headers"]["Nats-Msg-Id"] == m["body"]["id"] for m in messages if "camera" in m["body"])

    # per camera: publishers never overlap in `ts` (each run of one publisher ends before the next begins)
    runs = runs_by_camera(messages)
    for camera, cut in runs.items():
        for before, after in itertools.pairwise(cut):
            assert before[2] < after[1], f"{camera}: {before} overlaps {after}"
    killed_run = d3.journal()[0][3]  # its first run: the one SIGKILLed (it came back as another run)
    stopped_run = d2.journal()[-1][3]
    for camera in killed:  # the killed run published the camera once, up to its kill, and another took over
        publishers = [who.split("/")[1] for who, *_ in runs[camera]]
        assert publishers.count(killed_run) == 1, publishers
        assert publishers.index(killed_run) < len(publishers) - 1, publishers
    gaps = []
    for camera in leaving:  # a graceful stop hands over at once: far sooner than a lease would expire
        cut = runs[camera]
        at = [i for i, (who, *_) in enumerate(cut) if who.endswith(stopped_run)][-1]
        assert at < len(cut) - 1, cut
        gaps.append(cut[at + 1][1] - cut[at][2])
    print(f"graceful hand-over, from the last event of the stopped daemon to the first of the next: "
          f"{', '.join(f'{g:.2f}' for g in sorted(gaps))} s")
    assert max(gaps) < TTL / 2, gaps


def test_bad_input_is_a_clear_error_retried_until_fixed_and_nothing_is_lost(tmp_path):
    """On loopback (the namespaces add nothing here). The server is down at start; when it comes it holds a lease
    bucket with another TTL, a member value vigild did not write and a stream with other limits: each a clear error
    in the status and the log, retried, never a crash; once fixed, every camera is held and every event journaled
    meanwhile reaches the stream."""
    cameras = ["g1", "g2"]
    server = NatsServer(tmp_path / "nats")

    async def prepare() -> None:
        nc = await connect(server.url)
        js = nc.jetstream()
        await js.create_key_value(bucket="vigild_leases", history=1)  # no TTL: leases would never expire
        members = await js.create_key_value(bucket="vigild_members", history=1, ttl=TTL)
        await members.put("intruder", b"not json at all")
        await js.add_stream(name=STREAM, subjects=["vigild.>"], max_age=86_400.0)  # one day, not seven
        await nc.close()

    server.start()
    run(prepare())
    server.stop()
    member = Member(tmp_path, 1, server.url, "lone", plugin_site(tmp_path), None, cameras=cameras).start()
    try:
        check_bad_input(member, server, cameras)
    finally:
        member.stop()
        server.stop()


def check_bad_input(member: Member, server: NatsServer, cameras: list[str]) -> None:
    try:
        wait_until(lambda: "cannot connect" in str((member.status() or {}).get("cluster", {}).get("error")),
                   "the unreachable server reported", 60)  # fmt: skip
        status = member.status()
        assert status is not None
        assert {c["state"] for c in status["cameras"].values()} == {"unassigned"}
        assert "cannot connect" in str(status["outputs"]["nats"]["connection_error"])
        assert status["cluster"]["ready"] is False

        server.start()
        wait_until(lambda: "keeps keys 0 s" in str(member.cluster().get("error")), "the bucket's TTL reported", 60)
        wait_until(lambda: "other limits" in str((member.status() or {})["outputs"]["nats"]["stream_error"]),
                   "the stream's limits reported", 60)  # fmt: skip
        status = member.status()
        assert status is not None and status["cluster"]["held"] == []
        assert "lease_ttl_s" in status["cluster"]["error"]
        assert "max_age 86400.0 (the config says 604800.0)" in status["outputs"]["nats"]["stream_error"]
        assert member.process is not None and member.process.poll() is None

        async def fix() -> None:
            nc = await connect(server.url)
            js = nc.jetstream()
            await js.delete_key_value("vigild_leases")
            await js.delete_stream(STREAM)
            await nc.close()

        run(fix())
        wait_until(lambda: member.held() == set(cameras), "both cameras held once the bucket is fixed", 60)
        wait_until(lambda: (member.status() or {})["outputs"]["nats"]["stream_error"] is None, "stream made", 60)
        time.sleep(2)
    finally:
        member.stop()
    log = member.log()
    assert "Traceback" not in log, log[-3000:]
    assert "holds a value vigild did not write under 'intruder'" in log
    messages = stream_messages(server.url, STREAM)
    journaled = [row[0] for row in member.journal()]
    stored = {m["body"]["id"] for m in messages if "id" in m["body"]}
    assert journaled and set(journaled) <= stored, f"{len(set(journaled) - stored)} of {len(journaled)} missing"


def test_wrong_credentials_are_reported_without_the_password(tmp_path):
    server = NatsServer(tmp_path / "nats", users={"vigild": "right-password"}).start()
    secret = "wrong-password-3141"
    login = f", username: vigild, password: {secret}"
    member = Member(tmp_path, 1, server.url, "lone", plugin_site(tmp_path), None, cameras=["w1"], login=login).start()
    try:
        wait_until(lambda: "Authorization" in str(member.cluster().get("error")), "the refusal reported", 60)
        status = member.status()
        assert status is not None and member.process is not None and member.process.poll() is None
        assert status["cameras"]["w1"]["state"] == "unassigned"
    finally:
        member.stop()
        server.stop()
    assert secret not in member.log() and secret not in str(status)
