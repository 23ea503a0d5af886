"""The daemon's outputs, running: the ZeroMQ publisher and the journal (their own sections), and the `outputs:`
entries, each made from its config, started and attached to the bus, reloaded one by one, reported in the status
as `outputs.<id>` (docs/outputs.md).

A reload checks the entries that arrive or change before anything is changed (a file that cannot be opened refuses
the reload, named by its key); once the rest of the change is committed, the entries that left or changed are
stopped (a changed one first delivers what it holds and stores its cursor), then the new ones started: one that
catches up goes on from where its predecessor stopped. An entry that failed (it did not start, or its thread ended
on an error) stays in the status as `failed` with its error, and the next reload starts it again, changed or not.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vigild import __version__
from vigild.config.cluster import ClusterConfig, NatsServer
from vigild.config.loading import Config
from vigild.config.outputs import FileOutputConfig, MqttOutputConfig, NatsOutputConfig, OutputConfig
from vigild.config.yamlsource import KeyPath
from vigild.natslink import NatsLink, NatsLinks, NatsLogin
from vigild.outputs.base import OutputError, QueuedOutput
from vigild.outputs.bus import EventBus, Output
from vigild.outputs.catchup import JournalLink
from vigild.outputs.file import FileOutput, check_appendable
from vigild.outputs.mqtt import CameraSwitch, MqttContext, MqttOutput, check_mqtt
from vigild.outputs.nats import NatsOutput

log = logging.getLogger("vigild.outputs")


class OutputRefused(Exception):
    """An `outputs:` entry cannot start (its file cannot be opened); `key` is where it is set."""

    def __init__(self, key: KeyPath, message: str):
        self.key = key
        super().__init__(message)


def default_daemon_id(config_file: Path | None) -> str:
    """This daemon's name where several meet (an MQTT broker): the host name and 8 hex digits of the config file's
    absolute path, so that two daemons on one host (one config file each) differ, and a restart keeps it."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])[:40] or "host"
    path = str(config_file.resolve()) if config_file is not None else ""
    return f"{host}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def nats_login(url: str, server: NatsServer) -> NatsLogin:
    username, password, creds = server.login()
    return NatsLogin(url, username, password, creds)


@dataclass(frozen=True)
class NatsContext:
    """What a `nats` output needs beyond its entry: the daemon's connections, the `cluster:` section whose server an
    entry without `url` shares, and the name its headers carry."""

    links: NatsLinks
    cluster: ClusterConfig | None
    member: str

    def login(self, config: NatsOutputConfig) -> NatsLogin:
        if config.url is not None:
            return nats_login(config.url, config)
        assert self.cluster is not None, "checked at load: a nats output without url needs a cluster section"
        return nats_login(self.cluster.nats, self.cluster)

    def link(self, config: NatsOutputConfig) -> Callable[[], NatsLink]:
        login = self.login(config)
        return lambda: self.links.get(login)


def make_output(config: OutputConfig, journal: JournalLink | None, context: MqttContext,
                nats: NatsContext | None = None) -> QueuedOutput:  # fmt: skip
    """The output an `outputs:` entry describes (not started)."""
    if isinstance(config, NatsOutputConfig):
        nats = nats or NatsContext(NatsLinks(context.daemon_id), None, context.daemon_id)
        return NatsOutput(config, journal, nats.link(config), nats.member)
    if isinstance(config, FileOutputConfig):
        return FileOutput(config, journal)
    if isinstance(config, MqttOutputConfig):
        if config.daemon_id is not None:
            context = MqttContext(config.daemon_id, context.version, context.cameras)
        return MqttOutput(config, journal, context)
    raise TypeError(f"no output of type {config.type!r}")  # pragma: no cover: the config's union says which


def check_output(config: OutputConfig) -> tuple[str, str]:
    """What can be checked before the output starts: (the key, what is wrong), or ("", "")."""
    try:
        if isinstance(config, FileOutputConfig):
            check_appendable(config.path)
        elif isinstance(config, MqttOutputConfig):
            check_mqtt(config)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(config, FileOutputConfig):
            return "path", f"cannot open {config.path}: {reason}"
        name = getattr(exc, "filename", None)
        return "tls", f"cannot use {name}: {reason}" if name else reason
    return "", ""


class Outputs:
    def __init__(self, bus: EventBus, journal: Callable[[], JournalLink | None],
                 builtin: Callable[[], list[Output]] = list, config_file: Path | None = None,
                 cameras: CameraSwitch | None = None, links: NatsLinks | None = None,
                 cluster: ClusterConfig | None = None):  # fmt: skip
        """`journal`: the journal's writer once it is open (None: none this run); `builtin`: the publisher and the
        journal's writer, which have sections of their own and are reported with the rest; `cameras`: what MQTT
        commands pause and resume."""
        self._context = MqttContext(default_daemon_id(config_file), __version__, cameras)
        member = cluster.name if cluster is not None else self._context.daemon_id
        self._nats = NatsContext(links or NatsLinks(member), cluster, member)
        self._bus = bus
        self._journal = journal
        self._builtin = builtin
        self._entries: dict[str, tuple[OutputConfig, QueuedOutput]] = {}

    def check(self, config: Config) -> None:
        """Every entry of `config` that would start (new or changed) can: else OutputRefused naming its key."""
        for position, entry in enumerate(config.settings.outputs):
            running = self._entries.get(entry.name)
            if running is not None and running[0] == entry:
                continue
            key, problem = check_output(entry)
            if problem:
                raise OutputRefused(("outputs", position, key), problem)

    def start(self, config: Config) -> None:
        """Start every entry (at daemon start, after `check`)."""
        for entry in config.settings.outputs:
            self._start(entry)

    def apply(self, entries: Sequence[OutputConfig]) -> dict[str, list[str]]:
        """Make the running entries those of `entries`: what was stopped, started and restarted."""
        wanted = {entry.name: entry for entry in entries}
        leaving = [  # changed, gone, or failed (a reload tries it again)
            name for name, (config, output) in self._entries.items()
            if wanted.get(name) != config or output.state == "failed"
        ]  # fmt: skip
        arriving = [name for name, entry in wanted.items() if name not in self._entries or name in leaving]
        for name in leaving:
            self._stop(name)
        for name in arriving:
            self._start(wanted[name])
        return {
            "started": sorted(set(arriving) - set(leaving)),
            "stopped": sorted(set(leaving) - set(arriving)),
            "restarted": sorted(set(leaving) & set(arriving)),
        }

    def stop(self) -> None:
        for name in list(self._entries):
            self._stop(name)

    def status(self) -> dict[str, Any]:
        """`outputs.<id>`: state, lag (events behind the bus, and seconds), drops by reason."""
        last = self._bus.last_seq
        report = {}
        for output in [*self._builtin(), *(output for _, output in self._entries.values())]:
            status = output.status()
            seen = status.get("cursor") or status.get("last_seq")
            if seen:  # behind the bus: what it holds, or missed while it was stopped
                status["lag_events"] = max(status["lag_events"], last - seen)
            report[output.id] = status
        return report

    def _start(self, entry: OutputConfig) -> None:
        output = make_output(entry, self._journal(), self._context, self._nats)
        self._entries[entry.name] = (entry, output)  # a failed one too: the status says why; a reload tries again
        try:
            output.start()
        except OutputError as exc:
            log.error("output %s did not start: %s; the other outputs go on", entry.name, exc)
            return
        self._bus.attach(output)
        log.info("output %s (%s) started", entry.name, entry.type)

    def _stop(self, name: str) -> None:
        _, output = self._entries.pop(name)
        self._bus.detach(output)
        output.stop()
        log.info("output %s stopped", name)
