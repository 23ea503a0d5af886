"""Camera placement: N identical daemons share one camera list through leases in NATS JetStream key-value buckets
(docs/cluster.md).

- **Members.** Each daemon registers under `<name>.<run>` in `<prefix>_members`, a bucket whose `max_age` is the
  lease TTL, and renews every `renew_s`: the bucket's keys are the members alive. A member is its name and its run,
  so two daemons with one name (identical replicas) are two members.
- **Leases.** A camera is held by whoever created its key in `<prefix>_leases` (create: only if absent). The holder
  renews it by compare-and-set on its revision; a graceful stop deletes it; a dead holder's key expires with the
  bucket's `max_age`. NATS 2.9 has no per-key TTL and sends no watch event when a key expires, so expiry is found by
  reading the bucket each round (every `renew_s`); a deletion is seen at once through a watch.
- **Shares.** Every member computes every member's share of the cameras the same way (`shares`: even, capped by
  capacity, the remainder to the first members by key), claims free cameras up to its share and releases what it
  holds beyond it, so that cameras spread evenly and move when a member joins or leaves.
- **Fencing**, on the events' `ts`: a camera's events pass the bus only while their `ts` falls in a period this
  daemon held the lease: from just after the create succeeded to `renew sent + ttl - fence_margin_s` (what the server
  can expire, less the clock difference tolerated), or to the release. A daemon that cannot renew (a partition, a
  paused process) stops publishing the camera's events before its lease can expire, and stops the camera; events it
  made while it held the lease stay in its journal and are published later with their `ts` inside its period.

The rounds run on the NATS connection's loop (vigild.natslink); starting and stopping cameras blocks, so it runs on a
thread of its own (`CameraMover`), never on the loop that renews the leases.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import queue
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from vigild.cluster.view import read_bucket
from vigild.config.cluster import ClusterConfig
from vigild.lifecycle import ServiceThread
from vigild.natslink import NatsLink

log = logging.getLogger("vigild.cluster")

DEADLINE_CHECK_S = 0.1
STOP_TIMEOUT_S = 10.0


class CameraHolder(Protocol):
    """What placement needs of the daemon (vigild.service.daemon.Daemon)."""

    def hold(self, name: str) -> None:
        """Start capturing `name` (this daemon now holds its lease)."""

    def release(self, name: str, reason: str) -> None:
        """Stop capturing `name` (`camera.down` with `reason`: `released`, `lease_lost`)."""

    def cluster_cameras(self) -> list[str]:
        """The cameras of the configuration (every member has the same list)."""
        ...


def shares(total: int, members: list[tuple[str, int]]) -> dict[str, int]:
    """Each member's share of `total` cameras: as even as their capacities allow, the remainder going to the first
    members by key. `members`: (key, capacity). Every member computes the same from the same view."""
    result = {key: 0 for key, _ in members}
    open_ = sorted(members)
    left = total
    while left > 0 and open_:
        each = left // len(open_)
        if each == 0:  # fewer cameras left than members: one each to the first ones
            for key, _ in open_[:left]:
                result[key] += 1
            break
        still = []
        for key, capacity in open_:
            give = min(each, capacity - result[key])
            result[key] += give
            left -= give
            if result[key] < capacity:
                still.append((key, capacity))
        open_ = still
    return result


@dataclass
class Period:
    """A time this daemon held a camera's lease, in wall-clock seconds (the events' `ts`)."""

    since: float
    until: float
    """The fence: renewal sent + ttl - margin, moved on by each renewal; the release time once released."""
    released: bool = False


class Fence:
    """What the bus asks of each camera event: was its `ts` inside a period this daemon held the camera?"""

    def __init__(self) -> None:
        self._periods: dict[str, Period] = {}
        self._lock = threading.Lock()

    def allows(self, camera: str, ts: float) -> bool:
        period = self._periods.get(camera)
        return period is not None and period.since <= ts <= period.until

    def open(self, camera: str, since: float, until: float) -> None:
        with self._lock:
            self._periods[camera] = Period(since, until)

    def extend(self, camera: str, until: float) -> None:
        with self._lock:
            period = self._periods.get(camera)
            if period is not None and not period.released:
                period.until = max(period.until, until)

    def close(self, camera: str, at: float) -> None:
        with self._lock:
            period = self._periods.get(camera)
            if period is not None and not period.released:
                period.until = min(period.until, at)
                period.released = True

    def until(self, camera: str) -> float | None:
        period = self._periods.get(camera)
        return None if period is None or period.released else period.until


@dataclass
class Lease:
    camera: str
    revision: int
    since: float


@dataclass
class View:
    """What the last round read: members alive (key → value) and leases (camera → holder's member key)."""

    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    leases: dict[str, str] = field(default_factory=dict)
    read_at: float = 0.0


class CameraMover:
    """Starts and stops cameras on a thread of its own, in the order asked (they block for up to seconds)."""

    def __init__(self, holder: CameraHolder):
        self._holder = holder
        self._queue: queue.Queue[tuple[Callable[[], None], Callable[[], None] | None] | None] = queue.Queue()
        self._thread = ServiceThread("cluster-cameras", self._serve)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.stop(STOP_TIMEOUT_S)

    def run(self, job: Callable[[], None], then: Callable[[], None] | None = None) -> None:
        """Run `job` on the mover's thread, then `then` (even when `job` failed)."""
        self._queue.put((job, then))

    def _serve(self, thread: ServiceThread) -> None:
        thread.ready()
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, then = item
            try:
                job()
            except Exception as exc:
                log.error("cluster: %s: %s", type(exc).__name__, exc)
            finally:
                if then is not None:
                    then()


class BucketProblem(Exception):
    """A bucket exists but is not one vigild can use as configured; the message says why."""


class Placement:
    def __init__(self, config: ClusterConfig, link: NatsLink, holder: CameraHolder, run: str,
                 clock: Callable[[], float] = time.time):  # fmt: skip
        self.config = config
        self.link = link
        self.holder = holder
        self.run = run
        self.member = f"{config.name}.{run}"
        self.fence = Fence()
        self.view = View()
        self.held: dict[str, Lease] = {}
        """Leases this daemon holds (the loop's thread only)."""
        self.starting: set[str] = set()
        """Held cameras whose capture is being started."""
        self.releasing: set[str] = set()
        self.problem: str | None = None
        self.registered = False
        self.rounds = 0
        self.kv_ops = 0
        self.takeovers = 0
        self.lost = 0
        self.foreign: set[str] = set()
        self._clock = clock
        self._mover = CameraMover(holder)
        self._wake: asyncio.Event | None = None
        self._task: concurrent.futures.Future[None] | None = None
        self._members: Any = None
        self._leases: Any = None
        self._watchers: list[Any] = []
        self._watching: list[asyncio.Future[None]] = []
        self._bucket_conn = -1
        self._stopping = False

    # ----- from the daemon's threads

    def start(self) -> None:
        self._mover.start()
        self.link.on_connect(self._reconnected)
        self.link.acquire()
        self._task = self.link.submit(self._main())

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful: deregister and delete every lease held (the caller stopped the cameras first, and
        `released_all` closed their fences), so that other members take the cameras at once."""
        self._stopping = True
        try:
            self.link.call(self._leave(), timeout)
        except Exception as exc:
            log.warning("cluster: could not release the leases at stop (%s: %s); they expire within %.0f s",
                        type(exc).__name__, exc, self.config.lease_ttl_s)  # fmt: skip
        if self._task is not None:
            self._task.cancel()
        self._mover.stop()
        self.link.release()

    def released_all(self) -> None:
        """The daemon stopped every camera (it is stopping): no event made from now on belongs to a lease."""
        now = self._clock()
        for camera in list(self.held):
            self.fence.close(camera, now)

    def ready(self) -> bool:
        """Registered, and every camera held is streaming (a member holding none is ready)."""
        return self.registered and self.problem is None and not self.starting

    def holder_of(self, camera: str) -> str | None:
        """The member holding `camera` as last read (None: no one)."""
        if camera in self.held:
            return self.member
        return self.view.leases.get(camera)

    def status(self) -> dict[str, Any]:
        members = self.view.members
        cameras = self.holder.cluster_cameras()
        target = self._target(cameras)
        return {
            "member": self.member,
            "name": self.config.name,
            "capacity": self.config.capacity,
            "connected": self.link.connected.is_set(),
            "error": self.problem or self.link.error,
            "registered": self.registered,
            "ready": self.ready(),
            "members": sorted(members),
            "share": target,
            "held": sorted(self.held),
            "elsewhere": {c: m for c, m in sorted(self.view.leases.items()) if c not in self.held},
            "unassigned": sorted(set(cameras) - set(self.view.leases) - set(self.held)),
            "rounds": self.rounds,
            "kv_ops": self.kv_ops,
            "takeovers": self.takeovers,
            "lost": self.lost,
            "foreign_values": sorted(self.foreign),
        }

    # ----- the loop's thread

    async def _reconnected(self) -> None:
        self._bucket_conn = -1
        if self._wake is not None:
            self._wake.set()

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        deadlines = asyncio.create_task(self._deadlines())
        try:
            while not self._stopping:
                self._wake.clear()  # before the round: a change seen during it starts the next one at once
                if self.link.connected.is_set():
                    try:
                        await self._round()
                        if self.problem is not None:
                            log.info("cluster: placement works again")
                        self.problem = None
                    except BucketProblem as exc:
                        self._report(str(exc))
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # a timeout, the connection lost under way: the next round retries
                        self._report(f"{type(exc).__name__}: {exc}")
                        self._bucket_conn = -1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.config.renew_s)
        finally:
            deadlines.cancel()

    def _report(self, problem: str) -> None:
        if problem != self.problem:
            log.error("cluster: %s; retrying every %.1f s", self.link.login.redact(problem), self.config.renew_s)
        self.problem = problem

    async def _buckets(self) -> None:
        """Open (or create) both buckets on this connection, checking that they are what the config says."""
        if self._bucket_conn == self.link.connects and self._members is not None:
            return
        from nats.js.errors import BucketNotFoundError

        js = self.link.nc.jetstream()
        opened = []
        for suffix in ("members", "leases"):
            bucket = f"{self.config.bucket_prefix}_{suffix}"
            try:
                kv = await js.key_value(bucket)
                info = await js.stream_info(f"KV_{bucket}")
                ttl = float(info.config.max_age or 0.0)
                if not math.isclose(ttl, self.config.lease_ttl_s, abs_tol=0.001):
                    raise BucketProblem(f"the bucket {bucket} keeps keys {ttl:g} s (0: forever), the config's "
                                        f"lease_ttl_s is {self.config.lease_ttl_s:g}: delete the bucket (`nats kv del "
                                        f"{bucket}`) or set lease_ttl_s to match")  # fmt: skip
            except BucketNotFoundError:
                kv = await js.create_key_value(bucket=bucket, ttl=self.config.lease_ttl_s, history=1,
                                               replicas=self.config.replicas)  # fmt: skip
                log.info("cluster: created the bucket %s (keys live %g s)", bucket, self.config.lease_ttl_s)
            opened.append(kv)
        self._members, self._leases = opened
        self.kv_ops += 4
        for watcher in self._watchers:
            try:
                await watcher.stop()
            except Exception:
                log.debug("cluster: old watcher", exc_info=True)
        self._watchers = [await kv.watchall(include_history=False) for kv in (self._members, self._leases)]
        self._watching = [asyncio.ensure_future(self._watch(watcher, members))
                          for watcher, members in zip(self._watchers, (True, False), strict=True)]  # fmt: skip
        self._bucket_conn = self.link.connects

    async def _watch(self, watcher: Any, members: bool) -> None:
        """A lease deleted (a graceful release), a member come or gone: a round at once, for the shortest hand-over.
        Renewals (of leases and registrations) start none."""
        while not self._stopping and watcher in self._watchers:
            try:
                entry = await watcher.updates(timeout=self.config.lease_ttl_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                continue
            if entry is not None and not hasattr(entry, "operation"):  # the watch ended (nats-py's sentinel)
                return
            if entry is None or self._wake is None:
                continue
            if entry.operation is not None or (members and entry.key not in self.view.members):
                self._wake.set()

    async def _read(self, kv: Any, bucket: str) -> dict[str, tuple[bytes, int]]:
        values = await read_bucket(self.link.nc.jetstream(), kv, bucket)
        self.kv_ops += 2
        return values

    def _parse(self, bucket: str, key: str, raw: bytes, needed: tuple[str, ...]) -> dict[str, Any] | None:
        try:
            value = json.loads(raw)
            if isinstance(value, dict) and all(k in value for k in needed):
                return value
        except ValueError:
            pass
        where = f"{bucket}:{key}"
        if where not in self.foreign:
            self.foreign.add(where)
            log.warning("cluster: the bucket %s holds a value vigild did not write under %r; ignored (it expires "
                        "within %g s unless rewritten)", bucket, key, self.config.lease_ttl_s)  # fmt: skip
        return None

    def _target(self, cameras: list[str]) -> int:
        members = [(key, int(value.get("capacity", 0))) for key, value in self.view.members.items()]
        if self.member not in self.view.members:
            members.append((self.member, self.config.capacity))
        return shares(len(cameras), members).get(self.member, 0)

    async def _round(self) -> None:
        await self._buckets()
        config, now = self.config, self._clock()
        # 1. renew what is held (before anything else: the leases are what must not lapse)
        if self.held:
            await asyncio.gather(*(self._renew(lease) for lease in list(self.held.values())))
        # 2. register (renew) this member
        body = json.dumps({"name": config.name, "run": self.run, "capacity": config.capacity, "since": now,
                           "held": len(self.held)}).encode()  # fmt: skip
        await self._members.put(self.member, body)
        self.kv_ops += 1
        self.registered = True
        # 3. read both buckets
        members = {}
        for key, (raw, _) in (await self._read(self._members, f"{config.bucket_prefix}_members")).items():
            value = self._parse(f"{config.bucket_prefix}_members", key, raw, ("name", "run", "capacity"))
            if value is not None:
                members[key] = value
        cameras = self.holder.cluster_cameras()
        leases = {}
        for key, (raw, _) in (await self._read(self._leases, f"{config.bucket_prefix}_leases")).items():
            value = self._parse(f"{config.bucket_prefix}_leases", key, raw, ("member",))
            leases[key] = str(value["member"]) if value is not None else "(unknown)"
        self.view = View(members, leases, now)
        self.rounds += 1
        # 4. claim up to the share, release beyond it
        target = self._target(cameras)
        mine = [c for c in self.held if c not in self.releasing]
        if len(mine) > target:
            for camera in sorted(mine, key=lambda c: self._order(c), reverse=True)[: len(mine) - target]:
                self._release(camera, "released")
        elif len(mine) < target:
            wanted = target - len(mine)
            for camera in sorted((c for c in cameras if c not in leases and c not in self.held), key=self._order):
                if wanted == 0:
                    break
                if await self._claim(camera):  # another member may be first: then the next free one
                    wanted -= 1
        for camera in [c for c in self.held if c not in cameras and c not in self.releasing]:
            self._release(camera, "released")  # removed from the configuration

    def _order(self, camera: str) -> int:
        """Members try free cameras in different orders, so that they seldom race for the same one."""
        return zlib.crc32(f"{self.member}/{camera}".encode())

    def _value(self, since: float) -> bytes:
        return json.dumps({"member": self.member, "name": self.config.name, "run": self.run, "since": since,
                           "renewed": self._clock()}).encode()  # fmt: skip

    async def _claim(self, camera: str) -> bool:
        """Create `camera`'s lease and start it; False if another member holds it."""
        from nats.js.errors import KeyWrongLastSequenceError

        sent = self._clock()
        try:
            revision = await self._leases.create(camera, self._value(sent))
        except KeyWrongLastSequenceError:
            self.kv_ops += 1
            return False  # another member was first
        self.kv_ops += 1
        since = self._clock()  # the server took it by now: no other member's period reaches past this
        self.held[camera] = Lease(camera, revision, since)
        self.fence.open(camera, since, sent + self.config.lease_ttl_s - self.config.fence_margin_s)
        self.takeovers += 1
        self.starting.add(camera)
        log.info("cluster: %s holds camera %s", self.member, camera)
        loop = asyncio.get_running_loop()
        def started() -> None:
            loop.call_soon_threadsafe(self.starting.discard, camera)

        self._mover.run(lambda: self.holder.hold(camera), started)
        return True

    async def _renew(self, lease: Lease) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        if lease.camera in self.releasing:
            return
        sent = self._clock()
        try:
            lease.revision = await self._leases.update(lease.camera, self._value(lease.since), last=lease.revision)
        except KeyWrongLastSequenceError:
            self.kv_ops += 1
            log.error("cluster: lost the lease of camera %s (it expired, or another member holds it)", lease.camera)
            self._lost(lease.camera)
            return
        self.kv_ops += 1
        self.fence.extend(lease.camera, sent + self.config.lease_ttl_s - self.config.fence_margin_s)

    def _lost(self, camera: str) -> None:
        """The lease is gone (or about to go): no more events, and the camera stops; no key to delete."""
        self.fence.close(camera, self._clock())
        self.lost += 1
        self.held.pop(camera, None)
        self.starting.discard(camera)
        self._mover.run(lambda: self.holder.release(camera, "lease_lost"))

    def _release(self, camera: str, reason: str) -> None:
        """Hand `camera` over: stop it, close its fence, then delete its lease (by revision) so that another member
        takes it at once."""
        self.releasing.add(camera)
        loop = asyncio.get_running_loop()

        def stopped() -> None:
            self.fence.close(camera, self._clock())
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._delete(camera)))

        log.info("cluster: %s hands camera %s over (%s)", self.member, camera, reason)
        self._mover.run(lambda: self.holder.release(camera, reason), stopped)

    async def _delete(self, camera: str) -> None:
        lease = self.held.pop(camera, None)
        self.releasing.discard(camera)
        if lease is None:
            return
        try:
            await self._leases.delete(camera, last=lease.revision)
            self.kv_ops += 1
        except Exception as exc:
            log.warning("cluster: could not delete the lease of %s (%s); it expires within %g s", camera, exc,
                        self.config.lease_ttl_s)  # fmt: skip

    async def _deadlines(self) -> None:
        """A lease not renewed in time: stop the camera before the server can give it to another member."""
        while True:
            await asyncio.sleep(DEADLINE_CHECK_S)
            now = self._clock()
            for camera in list(self.held):
                until = self.fence.until(camera)
                if until is not None and now > until and camera not in self.releasing:
                    log.error("cluster: could not renew the lease of camera %s in time: stopped it", camera)
                    self._lost(camera)

    async def _leave(self) -> None:
        """At a graceful stop (the cameras are stopped): delete the leases and the registration."""
        self._stopping = True
        if self._leases is None or not self.link.connected.is_set():
            return
        try:  # first: the others' shares grow before they see the leases go
            await self._members.delete(self.member)
        except Exception as exc:
            log.debug("cluster: deregister: %s", exc)
        await asyncio.gather(*(self._delete(camera) for camera in list(self.held)))
        for watcher in self._watchers:
            try:
                await watcher.stop()
            except Exception:
                log.debug("cluster: watcher stop", exc_info=True)


def holders(placement: Placement | None, cameras: Mapping[str, Any]) -> dict[str, str | None]:
    """Who holds each camera, for the status (None: not clustered)."""
    if placement is None:
        return {}
    return {name: placement.holder_of(name) for name in cameras}
