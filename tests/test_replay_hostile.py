"""The replay socket against hostile clients, over real sockets (issue 29): no request ends its thread, a thread
that dies anyway is served again and counted, at most `max_peers` clients are served at once (memory bounded by
construction: peers x queued replies x page bytes), and by default it is an ipc socket that only the daemon's user
and group can connect to, which a resuming subscriber finds without being told."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq
from conftest import free_endpoint, journal_record

from vigild import paths
from vigild.client import Subscriber
from vigild.config.settings import JournalConfig, PublisherConfig
from vigild.events import Event
from vigild.outputs import replay as replay_module
from vigild.outputs.bus import EventBus
from vigild.outputs.journal import Journal, JournalWriter, Record
from vigild.outputs.publisher import Publisher
from vigild.outputs.replay import MAX_PEERS, PAGE_BYTES, SEND_HWM, ReplayServer
from vigild.service.journaling import Journaling
from vigild.service.status import Heartbeat

RUN = "0" * 32
JPEG = b"\xff\xd8" + b"j" * 100_000  # a 100 kB snapshot


def record(seq: int, jpeg: bytes | None = None) -> Record:
    return journal_record({"schema": 1, "seq": seq, "id": f"{seq:032x}", "run": RUN, "type": "zone.enter", "camera": "door",
                   "frame": seq, "ts": "2030-01-01T00:00:00Z"}, jpeg)  # fmt: skip


@pytest.fixture
def served(tmp_path):
    """A journal of 30 events with 100 kB snapshots (3 MB: more than a page) and its replay socket."""
    journal = Journal(tmp_path / "journal.db")
    journal.write([record(seq, JPEG) for seq in range(1, 31)])
    server = ReplayServer(f"ipc://{tmp_path}/replay", JournalWriter(journal), SimpleNamespace(last_seq=30, run=RUN), max_peers=3)
    server.start()
    yield server
    server.stop()
    journal.close()


def client(server: ReplayServer) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(server.endpoint)
    return socket


def ask(socket: zmq.Socket, *frames: bytes, timeout_ms: int = 10_000) -> list[bytes]:
    socket.send_multipart([b"", *frames])
    assert socket.poll(timeout_ms), "the replay socket did not answer"
    return socket.recv_multipart()[1:]


def page(socket: zmq.Socket, after: int = 0) -> tuple[dict, list[bytes]]:
    header, *parts = ask(socket, json.dumps({"after_seq": after}).encode())
    return json.loads(header), parts


GARBAGE = [
    b"[" * 4000,  # RecursionError in json.loads: ended the thread before
    b"{" * 2000,
    b"\xff\xfe\x00",
    b"not json",
    b"9" * 4000,
    b'{"after_seq": 1e999}',
    b'{"after_seq": ' + b"9" * 4000 + b"}",
    b'{"after_seq": true}',
    b'{"after_seq": [1]}',
    b'{"after_seq": 1, "until_seq": "x"}',
    b'{"after_seq": 1, "limit": {"a": 1}}',
    b"[]",
    b"",
]


def test_no_request_ends_the_replay_thread_each_gets_an_error_and_a_good_one_is_still_served(served):
    socket = client(served)
    try:
        for bad in GARBAGE:
            reply = ask(socket, bad)
            answer = json.loads(reply[0])
            assert answer["code"] == "bad_request" and "not a replay request" in answer["error"], (bad[:20], answer)
        for frames in ([b"x", b"{}"], [b"", b"{}", b"more", b"frames"], [b"{}"] * 50):  # wrong shapes
            assert json.loads(ask(socket, *frames[1:] if frames[0] == b"" else frames)[0])["code"] == "bad_request"
        header, parts = page(socket, after=28)
        assert header["events"] == 2 and [json.loads(body)["seq"] for body in parts[::2]] == [29, 30]
        assert parts[1] == JPEG
        assert served.alive and served.restarts == 0 and served.errors == len(GARBAGE) + 3
    finally:
        socket.close()


def test_a_replay_thread_that_fails_is_served_again_and_counted(served, monkeypatch):
    socket = client(served)
    try:
        original = ReplayServer._next_request
        calls = []

        def fail_once(sock):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected")
            return original(sock)

        monkeypatch.setattr(served, "_next_request", fail_once)
        socket.send_multipart([b"", b'{"after_seq": 29}'])  # read by the failing call: lost with its socket
        deadline = time.monotonic() + 30
        while served.restarts == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        socket.close()
        socket = client(served)  # the socket was bound again: a new connection gets its answer
        assert page(socket, after=29)[0]["events"] == 1
        assert served.restarts == 1 and served.alive
    finally:
        socket.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_replay_thread_that_ends_anyway_is_started_again_by_the_status(served, monkeypatch):
    """A BaseException (not caught by the thread's own loop) ends the thread: the next status (each heartbeat asks)
    starts it again, counts it, and the socket serves."""
    ended = threading.Event()
    serve = ReplayServer._serve

    def end(self, thread):
        thread.ready()  # bound, serving: then it ends
        ended.set()
        raise SystemExit

    monkeypatch.setattr(ReplayServer, "_serve", end)
    served.stop()  # the running thread ends; make it look as if it had died on its own
    served._thread.stopping.clear()
    served.ensure_running()
    assert ended.wait(10)
    deadline = time.monotonic() + 10
    while served.alive:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert served.restarts == 1 and "SystemExit" in (served._thread.error or "")
    monkeypatch.setattr(ReplayServer, "_serve", serve)
    served.ensure_running()
    assert served.restarts == 2 and served.alive
    socket = client(served)
    try:
        assert page(socket, after=25)[0]["events"] == 5
    finally:
        socket.close()


def test_more_clients_than_it_serves_are_refused_counted_and_memory_is_bounded_by_construction(served):
    """Three clients that ask and never read hold the three places; a fourth is told `busy` (counted) and gets no
    page; a place is freed when its client disconnects. Each page holds at most PAGE_BYTES of events and
    snapshots, and ZeroMQ queues SEND_HWM of them per client: what the daemon holds is bounded whatever clients do."""
    idle = [client(served) for _ in range(3)]
    for socket in idle:
        for _ in range(2):  # asking again without reading: one reply queued, the other dropped
            socket.send_multipart([b"", b'{"after_seq": 0}'])
    late = client(served)
    try:
        deadline = time.monotonic() + 30
        while len(served.peers) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        answer = json.loads(ask(late, b'{"after_seq": 0}')[0])
        assert answer["code"] == "busy" and served.refused >= 1 and len(served.peers) == 3
        idle.pop().close()  # a client that leaves frees its place
        while True:
            header = json.loads(ask(late, b'{"after_seq": 0}')[0])
            if header.get("code") != "busy":
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the page: bodies and snapshots within PAGE_BYTES, the rest for the next page
        header, parts = page(late)
        assert sum(map(len, parts)) <= PAGE_BYTES and 0 < header["events"] < 30
        assert header["through"] == header["events"] == len(parts) // 2
        # by construction: at most MAX_PEERS clients x (SEND_HWM queued + 1 being written) x PAGE_BYTES
        assert MAX_PEERS * (SEND_HWM + 1) * PAGE_BYTES <= 32 << 20
    finally:
        late.close()
        for socket in idle:
            socket.close()


def test_one_event_larger_than_a_page_goes_alone(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    big = b"\xff\xd8" + b"b" * (PAGE_BYTES + 10)
    journal.write([record(1, big), record(2, JPEG)])
    server = ReplayServer(f"ipc://{tmp_path}/replay", JournalWriter(journal), SimpleNamespace(last_seq=2, run=RUN))
    server.start()
    socket = client(server)
    try:
        header, parts = page(socket)
        assert header["events"] == 1 and parts[1] == big
        assert page(socket, after=1)[0]["events"] == 1
    finally:
        socket.close()
        server.stop()
        journal.close()


@pytest.mark.parametrize("xdg", [True, False], ids=["xdg-runtime-dir", "no-xdg"])
def test_by_default_the_replay_socket_is_private_ipc_and_resume_finds_it_through_the_heartbeat(
    tmp_path, monkeypatch, xdg
):
    home = Path(tempfile.mkdtemp(prefix="vr-"))  # short: the socket path must fit in 107 bytes
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_STATE_HOME", "XDG_RUNTIME_DIR", "STATE_DIRECTORY", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    if xdg:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
        (tmp_path / "xdg").mkdir(mode=0o700)
    config = tmp_path / "cams.yaml"
    publisher = Publisher(PublisherConfig(endpoint=free_endpoint(), heartbeat_interval=0.2))
    publisher.start()
    bus = EventBus()
    bus.attach(publisher)
    journaling = Journaling(JournalConfig(path=tmp_path / "journal.db"), config, bus, None)
    journaling.start()
    beat = lambda: Event("heartbeat", "sys", time.time(), data={"publisher": {"last_seq": bus.last_seq},  # noqa: E731
                                                               "journal": journaling.status()})  # fmt: skip
    heartbeat = Heartbeat(0.2, beat, bus.publish)
    heartbeat.start()
    try:
        assert journaling.replay_endpoint == paths.replay_endpoint(config)
        socket_path = Path(journaling.replay_endpoint.removeprefix("ipc://"))
        assert socket_path.parent == paths.runtime_dir(config)
        assert stat.S_ISSOCK(os.stat(socket_path).st_mode)
        assert stat.S_IMODE(os.stat(socket_path).st_mode) & ~0o660 == 0  # user and group only
        assert stat.S_IMODE(os.stat(socket_path.parent).st_mode) & 0o007 == 0
        for index in range(1, 21):
            bus.publish(Event("zone.enter", "door", time.time(), index, data={"n": index}))
        deadline = time.monotonic() + 30
        while not (journaling.writer.idle and journaling.writer.through == 20):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with Subscriber(publisher.config.endpoint, resume=True, after_seq=0) as subscriber:  # no replay endpoint
            got: list[int] = []
            while len(got) < 20 and time.monotonic() < deadline:
                message = subscriber.receive(timeout=0.5)
                if message is not None and message.event.get("type") == "zone.enter":
                    got.append(message.event["seq"])
            assert got == list(range(1, 21)) and subscriber.replayed == 20 and subscriber.missed == 0
            assert subscriber.replay_endpoint == journaling.replay_endpoint
        assert journaling.status()["replay_restarts"] == 0
    finally:
        heartbeat.stop()
        publisher.stop()
        journaling.stop()
        shutil.rmtree(home)


def test_a_second_daemon_cannot_take_over_a_served_replay_socket(served):
    other = ReplayServer(served.endpoint, None, SimpleNamespace(last_seq=0, run=RUN))
    with pytest.raises(replay_module.ReplayError, match="another process is serving"):
        other.start()
    socket = client(served)
    try:
        assert page(socket, after=29)[0]["events"] == 1
    finally:
        socket.close()


def test_a_tcp_replay_socket_without_curve_is_insecure_even_on_loopback(tmp_path, caplog):
    server = ReplayServer(free_endpoint(), None, SimpleNamespace(last_seq=0, run=RUN))
    server.start()
    server.stop()
    assert any("INSECURE" in r.getMessage() and "every local user" in r.getMessage() for r in caplog.records)
