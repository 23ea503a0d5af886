"""The cluster's and the NATS output's costs (issue 35), against Debian's nats-server (JetStream) on a free loopback
port, in one run:

1. **Detection with the NATS output on and off**: the real daemon on vtest.avi (looping, as fast as the chain goes)
   with Yolo-Fastest-XL, ByteTrack and the analytics, each in a fresh process, alternately on and off, `--rounds`
   times; detection frames/s, the median of each and the ratio on / off (the goal: >= 0.95), with the spread.
2. **Publishing with deduplication**: a journal holding `--backlog` events (as after an outage) caught up by a NATS
   output into a fresh stream, every event with its `Nats-Msg-Id`; seconds until the stream acknowledged all of it,
   and events/s. Then the same backlog again (its cursor set back): every event a duplicate, dropped by the stream
   (the stream's count must not move).
3. **Takeover after a SIGKILL**: two real daemons (`vigild run`, test:// cameras, no plugins) sharing `--cameras`
   cameras (6 and 60 by default) with leases of `--ttl` s; one is killed; seconds until the other streams every
   camera. `--rounds` rounds each.
4. **A simulation of 20 members x 10 cameras**: 20 processes each running the real placement (vigild.cluster) over
   its own NATS connection, with a simulated camera holder instead of capture (`SimulatedCameras`: 20 daemons with
   torch would not fit on this machine): seconds to balance, the spread of cameras per member, KV operations/s
   (reads and writes, over all members), and seconds until a SIGKILLed member's cameras are held again.

    python bench/cluster.py [--rounds 3] [--seconds 30] [--warmup 10] [--backlog 96000] [--cameras 6,60] [--ttl 10]
                            [--members 20] [--per-member 10] [--skip-daemon] [--skip-publish] [--skip-takeover]
                            [--skip-simulation]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from contenders import in_fresh_process, start_daemon, vtest_daemon_yaml
from journal import ANALYTICS, GEOMETRY, SHARED, generate_day

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from nats_server import NatsServer, connect, run

ROOT = Path(__file__).resolve().parent.parent


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


# ----- 1. detection with the output on and off


def run_daemon(text: str, warmup: float, seconds: float, results: Any) -> None:
    """(In a fresh process.) The daemon of `text`: frames/s and events/s over `seconds` after `warmup`."""
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
        nats = daemon.outputs.status().get("nats", {})
    finally:
        daemon.stop()
    results.put({"fps": frames / elapsed, "events_s": events / elapsed, "nats": nats})


def daemon_ratio(args: argparse.Namespace, server: NatsServer) -> None:
    print(f"1. daemon: 1 looping vtest.avi, Yolo-Fastest-XL 320 + ByteTrack + analytics, cpu, {args.seconds:.0f} s "
          f"windows; the NATS output into a stream with deduplication")  # fmt: skip
    print(f"{'round':>5} {'nats':>5} {'fps':>7} {'events/s':>9} {'published':>9} {'lag':>5}")
    fps: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for on in (False, True) if round_ % 2 == 0 else (True, False):
            text = vtest_daemon_yaml(SHARED, 1, ANALYTICS, "cpu", camera_extra=GEOMETRY)
            text += (f"outputs:\n  - {{type: nats, url: '{server.url}', stream: BENCH{round_}, subject_prefix: "
                     f"bench{round_}}}\n") if on else ""  # fmt: skip
            result = in_fresh_process(run_daemon, (text, args.warmup, args.seconds), args.warmup + args.seconds + 600)
            fps[on].append(result["fps"])
            nats = result["nats"]
            print(f"{round_:>5} {'on' if on else 'off':>5} {result['fps']:>7.1f} {result['events_s']:>9.1f} "
                  f"{nats.get('published', '-'):>9} {nats.get('lag_events', '-'):>5}", flush=True)  # fmt: skip
    on, off = statistics.median(fps[True]), statistics.median(fps[False])
    print(f"detection frames/s, medians with the NATS output on / off: {on:.1f} ({spread(fps[True])}) / {off:.1f} "
          f"({spread(fps[False])}) = {on / off:.3f}x")  # fmt: skip


# ----- 2. publishing a backlog with deduplication


class Stored:
    """The journal link of an output catching up from a finished journal (vigild.outputs.catchup.JournalLink)."""

    def __init__(self, database: Path, through: int):
        self.database, self.through = database, through


def drain(server: NatsServer, database: Path, total: int, stream: str) -> float:
    import sqlite3

    from vigild.config.outputs import NatsOutputConfig
    from vigild.natslink import NatsLinks, NatsLogin
    from vigild.outputs.nats import NatsOutput

    db = sqlite3.connect(database)
    db.execute("INSERT OR REPLACE INTO output_cursors VALUES ('nats', 0, 0)")  # catch up from the start
    db.commit()
    db.close()
    config = NatsOutputConfig(type="nats", url=server.url, stream=stream, subject_prefix=stream.lower())
    links = NatsLinks("bench")
    output = NatsOutput(config, Stored(database, total), lambda: links.get(NatsLogin(server.url)), "bench")
    began = time.monotonic()
    output.start()
    while (output.stored or 0) < total:
        time.sleep(0.05)
        if time.monotonic() - began > 3600:
            raise RuntimeError(f"the stream acknowledged {output.stored} of {total}")
    took = time.monotonic() - began
    output.stop()
    return took


def stream_count(server: NatsServer, stream: str) -> int:
    async def count() -> int:
        nc = await connect(server.url)
        try:
            return int((await nc.jetstream().stream_info(stream)).state.messages)
        finally:
            await nc.close()

    return int(run(count()))


def publish(args: argparse.Namespace, server: NatsServer) -> None:
    database = Path(tempfile.mkdtemp(prefix="vigild-bench-nats-")) / "journal.db"
    cameras, rate = 16, 10.0
    seconds = args.backlog / (cameras * rate)
    total = generate_day(database, cameras, rate, time.time() - seconds, seconds)
    print(f"\n2. a backlog of {total:,} events ({cameras} cameras x {rate:g} events/s x {seconds / 60:.0f} min) "
          f"caught up into a JetStream stream on a local nats-server, each with its Nats-Msg-Id")  # fmt: skip
    print(f"{'round':>5} {'new s':>7} {'events/s':>9} {'again s':>8} {'events/s':>9} {'stream':>8}")
    new, again = [], []
    for round_ in range(args.rounds):
        stream = f"DRAIN{round_}"
        first = drain(server, database, total, stream)
        second = drain(server, database, total, stream)  # all duplicates: dropped by the stream
        count = stream_count(server, stream)
        new.append(total / first)
        again.append(total / second)
        print(f"{round_:>5} {first:>7.1f} {total / first:>9,.0f} {second:>8.1f} {total / second:>9,.0f} "
              f"{count:>8,}", flush=True)  # fmt: skip
        assert count == total, f"the stream holds {count}, not {total}: deduplication failed"
    print(f"published with deduplication: {statistics.median(new):,.0f} events/s (median; {spread(new)}); the same "
          f"events again, all dropped as duplicates: {statistics.median(again):,.0f} events/s ({spread(again)})")  # fmt: skip


# ----- 3. takeover after a SIGKILL


def cluster_yaml(directory: Path, url: str, cameras: int, ttl: float, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    listed = "".join(f"  k{i}: {{source: 'test://?width=32&height=32&fps=1'}}\n" for i in range(cameras))
    path = directory / "vigild.yaml"
    path.write_text(
        f"cameras:\n{listed}publisher: {{endpoint: 'tcp://127.0.0.1:0'}}\n"
        f"control: {{endpoint: 'ipc://{directory}/control'}}\n"
        f"journal: {{path: '{directory}/journal.db', replay_endpoint: 'ipc://{directory}/replay'}}\n"
        f"cluster: {{nats: '{url}', name: {name}, lease_ttl_s: {ttl}}}\ntorch_threads: 1\nlog_level: WARNING\n"
    )
    return path


def status(directory: Path) -> dict[str, Any]:
    from vigild.client import ControlClient

    try:
        with ControlClient(f"ipc://{directory}/control", timeout=2) as client:
            reply, _ = client.request("status")
    except TimeoutError:
        return {}
    return reply.get("result") or {}


def streaming(directory: Path) -> int:
    cameras = status(directory).get("cameras", {})
    return sum(1 for camera in cameras.values() if camera["state"] == "streaming")


def takeover_round(server: NatsServer, cameras: int, ttl: float, round_: int) -> float:
    base = Path(tempfile.mkdtemp(prefix="vigild-bench-takeover-"))
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    processes, dirs = [], []
    for name in ("a", "b"):
        directory = base / name
        config = cluster_yaml(directory, server.url, cameras, ttl, f"bench{round_}{name}")
        processes.append(subprocess.Popen([sys.executable, "-m", "vigild", "run", "-c", str(config)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=(directory / "log").open("w")))  # fmt: skip
        dirs.append(directory)
    try:
        deadline = time.monotonic() + 300
        while streaming(dirs[0]) + streaming(dirs[1]) < cameras or not streaming(dirs[0]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"never balanced: {(dirs[0] / 'log').read_text()[-2000:]}")
            time.sleep(0.2)
        time.sleep(2)
        processes[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while streaming(dirs[1]) < cameras:
            if time.monotonic() - killed > 300:
                raise RuntimeError("never taken over")
            time.sleep(0.05)
        return time.monotonic() - killed
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(60)


def takeover(args: argparse.Namespace, server: NatsServer) -> None:
    print(f"\n3. takeover after a SIGKILL: two daemons (test:// cameras, no plugins), leases of {args.ttl:g} s "
          f"(renewed every {args.ttl / 4:g} s); seconds from the kill until the survivor streams every camera")  # fmt: skip
    for cameras in (int(c) for c in args.cameras.split(",")):
        times = [takeover_round(server, cameras, args.ttl, round_) for round_ in range(args.rounds)]
        print(f"{cameras:>4} cameras: {statistics.median(times):.2f} s (median of {len(times)}; "
              f"{spread(times)})", flush=True)  # fmt: skip


# ----- 4. the placement simulation


class SimulatedCameras:
    """A camera holder that captures nothing: the placement-only members of the simulation (named as such)."""

    def __init__(self, cameras: list[str]):
        self.cameras = cameras
        self.holding: set[str] = set()

    def hold(self, name: str) -> None:
        self.holding.add(name)

    def release(self, name: str, reason: str) -> None:
        self.holding.discard(name)

    def cluster_cameras(self) -> list[str]:
        return self.cameras


def member(url: str, name: str, cameras: int, capacity: int, ttl: float, report: Path) -> None:
    """(A process of its own.) One placement-only member: the real Placement over its own NATS connection."""
    import uuid

    from vigild.cluster.placement import Placement
    from vigild.config.cluster import ClusterConfig
    from vigild.natslink import NatsLink, NatsLogin

    config = ClusterConfig(nats=url, name=name, capacity=capacity, lease_ttl_s=ttl)
    holder = SimulatedCameras([f"s{i:03}" for i in range(cameras)])
    placement = Placement(config, NatsLink(NatsLogin(url), name), holder, uuid.uuid4().hex)
    placement.start()
    while True:
        state = placement.status()
        state["holding"] = sorted(holder.holding)
        state["at"] = time.time()
        partial = report.with_suffix(".part")
        partial.write_text(json.dumps(state))
        partial.replace(report)
        time.sleep(0.2)


def simulation(args: argparse.Namespace, server: NatsServer) -> None:
    total = args.members * args.per_member
    capacity = args.per_member * 2
    print(f"\n4. simulation: {args.members} placement-only members (real placement, simulated cameras) x "
          f"{args.per_member} cameras = {total}, capacity {capacity} each, leases of {args.ttl:g} s")  # fmt: skip
    base = Path(tempfile.mkdtemp(prefix="vigild-bench-sim-"))
    reports = [base / f"m{i:02}.json" for i in range(args.members)]
    processes = []
    for i in range(args.members):
        argv = [sys.executable, __file__, "member", server.url, f"m{i:02}", str(total), str(capacity), str(args.ttl),
                str(reports[i])]  # fmt: skip
        processes.append(subprocess.Popen(argv, cwd=ROOT / "bench"))

    def states() -> list[dict[str, Any]]:
        out = []
        for report in reports:
            try:
                out.append(json.loads(report.read_text()))
            except (OSError, ValueError):
                out.append({})
        return out

    def balanced(alive: list[int]) -> bool:
        got = states()
        held = [len(got[i].get("holding", [])) for i in alive]
        return sum(held) == total and max(held) - min(held) <= 1

    try:
        began = time.monotonic()
        while not balanced(list(range(args.members))):
            if time.monotonic() - began > 600:
                raise RuntimeError(f"never balanced: {[len(s.get('holding', [])) for s in states()]}")
            time.sleep(0.2)
        settle = time.monotonic() - began
        before = states()
        time.sleep(args.seconds)
        after = states()
        ops = sum(a["kv_ops"] - b["kv_ops"] for a, b in zip(after, before, strict=True))
        span = statistics.median(a["at"] - b["at"] for a, b in zip(after, before, strict=True))
        held = [len(s["holding"]) for s in after]
        print(f"balanced after {settle:.1f} s: {min(held)}-{max(held)} cameras per member; KV operations "
              f"{ops / span:,.0f}/s over all members ({ops / span / args.members:.1f} per member)")  # fmt: skip
        victim = 0
        lost = set(after[victim]["holding"])
        processes[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        alive = list(range(1, args.members))
        while not balanced(alive):
            if time.monotonic() - killed > 600:
                raise RuntimeError("never rebalanced")
            time.sleep(0.05)
        took = time.monotonic() - killed
        final = [len(s["holding"]) for s in (states()[i] for i in alive)]
        print(f"a member with {len(lost)} cameras SIGKILLed: all {total} held again after {took:.1f} s, "
              f"{min(final)}-{max(final)} per member")  # fmt: skip
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(30)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "member":
        url, name, cameras, capacity, ttl, report = sys.argv[2:8]
        member(url, name, int(cameras), int(capacity), float(ttl), Path(report))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--backlog", type=int, default=96_000)
    parser.add_argument("--cameras", default="6,60")
    parser.add_argument("--ttl", type=float, default=10.0)
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--per-member", type=int, default=10)
    for part in ("daemon", "publish", "takeover", "simulation"):
        parser.add_argument(f"--skip-{part}", action="store_true")
    args = parser.parse_args()
    server = NatsServer(Path(tempfile.mkdtemp(prefix="vigild-bench-nats-server-"))).start()
    print(f"nats-server {subprocess.run([server.binary, '--version'], capture_output=True, text=True).stdout.strip()}"
          f" on {server.url}; {os.cpu_count()} CPUs")  # fmt: skip
    try:
        if not args.skip_daemon:
            daemon_ratio(args, server)
        if not args.skip_publish:
            publish(args, server)
        if not args.skip_takeover:
            takeover(args, server)
        if not args.skip_simulation:
            simulation(args, server)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
