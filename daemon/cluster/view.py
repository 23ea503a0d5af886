"""What `vigild cluster status` shows: the members and leases as the buckets hold them now, read with a connection
of its own (no daemon needed)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from vigild.config.cluster import ClusterConfig

READ_TIMEOUT_S = 5.0


async def read_bucket(js: Any, kv: Any, bucket: str, timeout: float = READ_TIMEOUT_S) -> dict[str, tuple[bytes, int]]:
    """Key → (value, revision) of every key `kv` holds now.

    Read with a watch of the last value per key, until the entry that says nothing more is pending (`delta` 0).
    nats-py's own end marker (a None) can come before the entries when the server pushed them before the client
    asked how many were pending, so it is not trusted."""
    info = await js.stream_info(f"KV_{bucket}")
    if not info.state.messages:
        return {}
    watcher = await kv.watchall(include_history=False)
    values: dict[str, tuple[bytes, int]] = {}
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=timeout)
            except TimeoutError:
                break  # what was there expired meanwhile
            if entry is None:
                continue
            if entry.operation is None:
                values[entry.key] = (entry.value or b"", entry.revision)
            if not entry.delta:
                break
    finally:
        await watcher.stop()
    return values


async def _read(js: Any, bucket: str) -> dict[str, Any] | None:
    """Key → value (parsed JSON, else the raw text) of `bucket`; None when there is no such bucket."""
    from nats.js.errors import BucketNotFoundError

    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        return None
    values: dict[str, Any] = {}
    for key, (raw, _) in (await read_bucket(js, kv, bucket)).items():
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw.decode(errors="replace")
    return values


async def read_cluster(config: ClusterConfig) -> dict[str, Any]:
    """{"members": {key: value}, "leases": {camera: value}} as the server holds them."""
    import nats

    options: dict[str, Any] = {"servers": [u.strip() for u in config.nats.split(",")], "connect_timeout": 3,
                               "allow_reconnect": False, "name": "vigild cluster status"}  # fmt: skip
    username, password, creds = config.login()
    if username is not None:
        options.update(user=username, password=password)
    if creds is not None:
        options["user_credentials"] = creds
    nc = await nats.connect(**options)
    try:
        js = nc.jetstream()
        members = await _read(js, f"{config.bucket_prefix}_members")
        leases = await _read(js, f"{config.bucket_prefix}_leases")
    finally:
        await nc.close()
    return {"members": members or {}, "leases": leases or {}, "buckets": members is not None}


def cluster_report(config: ClusterConfig, cameras: list[str]) -> dict[str, Any]:
    view = asyncio.run(asyncio.wait_for(read_cluster(config), 3 * READ_TIMEOUT_S))
    now = time.time()
    held: dict[str, list[str]] = {key: [] for key in view["members"]}
    leases = {}
    for camera, value in sorted(view["leases"].items()):
        member = value.get("member") if isinstance(value, dict) else None
        leases[camera] = {"member": member or "(not vigild's)",
                          "held_s": round(now - value["since"], 1) if isinstance(value, dict) and "since" in value
                          else None}  # fmt: skip
        if member in held:
            held[member].append(camera)
    members = {}
    for key, value in sorted(view["members"].items()):
        known = value if isinstance(value, dict) else {}
        members[key] = {"name": known.get("name"), "capacity": known.get("capacity"), "cameras": held.get(key, [])}
    return {
        "server": config.nats,
        "members": members,
        "leases": leases,
        "unassigned": sorted(set(cameras) - set(leases)),
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"cluster on {report['server']}: {len(report['members'])} member(s), {len(report['leases'])} camera(s) "
             f"held, {len(report['unassigned'])} unassigned"]  # fmt: skip
    for key, member in report["members"].items():
        cameras = ", ".join(member["cameras"]) or "none"
        lines.append(f"  {key}  capacity {member['capacity']}  holds {len(member['cameras'])}: {cameras}")
    for camera, lease in report["leases"].items():
        since = f"  for {lease['held_s']:g} s" if lease["held_s"] is not None else ""
        lines.append(f"  {camera:<20} {lease['member']}{since}")
    for camera in report["unassigned"]:
        lines.append(f"  {camera:<20} (no one)")
    return "\n".join(lines)
