"""A real Mosquitto for the MQTT tests (Debian's `mosquitto`): started on a free loopback port with a config, a
password file and a CA the test makes; stopped (SIGTERM, so that it saves its persistent sessions) and started
again on the same port to make outages. And a subscriber in a process of its own, with a persistent session."""

from __future__ import annotations

import getpass
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SUBSCRIBER = Path(__file__).with_name("mqtt_subscriber.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_ca(directory: Path, name: str = "ca") -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed: paths `ca`, `cert`, `key`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / f"{name}.crt", directory / f"{name}.key"
    cert, key, csr = directory / f"{name}-server.crt", directory / f"{name}-server.key", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", f"/CN=vigild test {name}")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))  # fmt: skip
    return {"ca": ca, "cert": cert, "key": key}


class Broker:
    def __init__(self, directory: Path, *, users: dict[str, str] | None = None, tls: dict[str, Path] | None = None,
                 extra: tuple[str, ...] = ()):  # fmt: skip
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.log = directory / "mosquitto.log"
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1",
                 f"allow_anonymous {'false' if users else 'true'}", "persistence true",
                 f"persistence_location {directory}/", "max_queued_messages 0", f"log_dest file {self.log}",
                 "log_type error", "log_type warning", "log_type notice", "log_type information",
                 "connection_messages true", *extra]  # fmt: skip
        if users:
            passwords = directory / "passwords"
            passwords.touch(mode=0o600)
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwords), user, password], check=True)
            lines.append(f"password_file {passwords}")
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}", f"keyfile {tls['key']}"]
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start: {self.log_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(20)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Subscriber:
    """`tests/mqtt_subscriber.py` in a process of its own: every message it gets, one JSON line each."""

    def __init__(self, broker: Broker, out: Path, topic: str, client_id: str, *, clean: bool = False,
                 username: str | None = None, password: str | None = None):  # fmt: skip
        self.out = out
        args = [sys.executable, str(SUBSCRIBER), "127.0.0.1", str(broker.port), topic, str(out), client_id]
        if clean:
            args.append("--clean")
        if username:
            args += ["--username", username, "--password", password or ""]
        self.process = subprocess.Popen(args)

    def messages(self) -> list[dict]:
        if not self.out.exists():
            return []
        lines = self.out.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_for(self, predicate, timeout: float, what: str = "") -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.messages()
            if predicate(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"never: {what}; {len(got)} messages, the last {got[-3:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
