"""A real NATS server for the tests (Debian's `nats-server`, with JetStream), on an address and free port the test
chooses, its store in the test's directory; stopped and started again on the same port to make outages. And a
small JetStream reader in the test's own process (nats-py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest


def require_nats_server() -> str:
    path = shutil.which("nats-server")
    if path is None:
        pytest.fail("nats-server is not installed (Debian's `nats-server`; `make test` installs it)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NatsServer:
    def __init__(self, directory: Path, host: str = "127.0.0.1", users: dict[str, str] | None = None):
        self.binary = require_nats_server()
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.host = host
        self.port = free_port(host)
        self.monitor = free_port(host)
        self.log = directory / "nats.log"
        lines = [f'listen: "{host}:{self.port}"', f'http: "{host}:{self.monitor}"',
                 f'jetstream {{ store_dir: "{directory}/store" }}']  # fmt: skip
        if users:
            entries = ", ".join(f'{{user: "{u}", password: "{p}"}}' for u, p in users.items())
            lines.append(f"authorization {{ users: [{entries}] }}")
        self.conf = directory / "nats.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> NatsServer:
        log = self.log.open("ab")
        self.process = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                assert self.process.poll() is None, self.log.read_text()[-2000:]
                time.sleep(0.05)
        raise AssertionError(f"nats-server did not listen on {self.url}: {self.log.read_text()[-2000:]}")

    def connections(self) -> list[dict[str, Any]]:
        """The server's client connections (its monitoring endpoint /connz): name, ip, port..."""
        import urllib.request

        with urllib.request.urlopen(f"http://{self.host}:{self.monitor}/connz?limit=1024", timeout=5) as reply:
            return list(json.load(reply).get("connections") or [])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def run(coro: Any, timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def connect(url: str, **options: Any) -> Any:
    import nats

    return await nats.connect(url, allow_reconnect=False, connect_timeout=5, **options)


def stream_messages(url: str, stream: str, **options: Any) -> list[dict[str, Any]]:
    """Every message of `stream` in order, as one durable JetStream consumer (a pull consumer from the start) gets
    them: subject, headers, body (parsed JSON) and stream seq. Each call makes a consumer of its own, so a second
    call reads from the start again rather than resuming where the first one acked."""

    async def read() -> list[dict[str, Any]]:
        import nats.errors

        nc = await connect(url, **options)
        try:
            js = nc.jetstream()
            consumer = await js.pull_subscribe(">", durable=f"test-reader-{uuid.uuid4().hex[:12]}", stream=stream)
            out = []
            while True:
                try:
                    batch = await consumer.fetch(500, timeout=2)
                except nats.errors.TimeoutError:
                    return out
                for message in batch:
                    out.append({"subject": message.subject, "headers": dict(message.headers or {}),
                                "body": json.loads(message.data), "seq": message.metadata.sequence.stream})  # fmt: skip
                    await message.ack()
        finally:
            await nc.close()

    return run(read(), 300)
