"""Network namespaces for the cluster tests: one bridge in the test's namespace with an address the test assigns,
and per daemon a namespace joined to it by a veth pair; all removed at the end. `ip` from iproute2 (`make test`
installs it); creating them needs CAP_NET_ADMIN (root, as on CI). Where that is impossible, `available()` says why and
the tests run the daemons on loopback instead (and say so)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

SUBNET = "10.213.{}.{}"


def _ip(*args: str, namespace: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, text=True)


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_NET_ADMIN)"
    probe = uuid.uuid4().hex[:6]
    name, bridge, outside, inside = f"vgp{probe}", f"vgpb{probe}", f"vgpo{probe}", f"vgpi{probe}"
    try:  # everything the tests make: a namespace, a bridge, a veth pair into the namespace
        _ip("netns", "add", name)
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", name)
        _ip("link", "set", outside, "master", bridge)
    except subprocess.CalledProcessError as exc:
        return f"`{' '.join(exc.cmd)}` failed: {exc.stderr.strip()}"
    finally:
        for argv in (["ip", "netns", "del", name], ["ip", "link", "del", outside], ["ip", "link", "del", bridge]):
            subprocess.run(argv, capture_output=True)
    return None


class Network:
    """A bridge `vgb<id>` at 10.213.<n>.1/24 and namespaces at .11, .12, ... (<n> from the id, so that two suites
    on one machine differ)."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:6]
        self.net = int(self.id, 16) % 200 + 20
        self.bridge = f"vgb{self.id}"
        self.host = SUBNET.format(self.net, 1)
        self.namespaces: list[str] = []
        # a fixed address: a bridge otherwise takes the lowest of its ports', and changes it when a port joins, which
        # leaves the namespaces' ARP entries for the host stale (connections fail until they expire, ~1 min)
        mac = f"02:76:67:{self.id[0:2]}:{self.id[2:4]}:{self.id[4:6]}"
        _ip("link", "add", self.bridge, "address", mac, "type", "bridge")
        _ip("addr", "add", f"{self.host}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self) -> tuple[str, str]:
        """A new namespace joined to the bridge: (its name, its address)."""
        index = len(self.namespaces) + 1
        name = f"vgn{self.id}{index}"
        outside, inside = f"vgh{self.id}{index}", f"vgi{self.id}{index}"
        address = SUBNET.format(self.net, 10 + index)
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", name)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("addr", "add", f"{address}/24", "dev", inside, namespace=name)
        _ip("link", "set", inside, "up", namespace=name)
        _ip("link", "set", "lo", "up", namespace=name)
        return name, address

    def command(self, namespace: str | None, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", namespace, *argv] if namespace else argv

    def close(self) -> None:
        for name in self.namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
