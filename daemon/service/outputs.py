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

import logging
from collections.abc import Callable, Sequence
from typing import Any

from vigild.config.loading import Config
from vigild.config.outputs import FileOutputConfig, OutputConfig
from vigild.config.yamlsource import KeyPath
from vigild.outputs.base import OutputError, QueuedOutput
from vigild.outputs.bus import EventBus, Output
from vigild.outputs.catchup import JournalLink
from vigild.outputs.file import FileOutput, check_appendable

log = logging.getLogger("vigild.outputs")


class OutputRefused(Exception):
    """An `outputs:` entry cannot start (its file cannot be opened); `key` is where it is set."""

    def __init__(self, key: KeyPath, message: str):
        self.key = key
        super().__init__(message)


def make_output(config: OutputConfig, journal: JournalLink | None) -> QueuedOutput:
    """The output an `outputs:` entry describes (not started)."""
    if isinstance(config, FileOutputConfig):
        return FileOutput(config, journal)
    raise TypeError(f"no output of type {config.type!r}")  # pragma: no cover: the config's union says which


def check_output(config: OutputConfig) -> None:
    """What can be checked before the output starts; OSError (or ValueError) saying what is wrong."""
    if isinstance(config, FileOutputConfig):
        check_appendable(config.path)


class Outputs:
    def __init__(self, bus: EventBus, journal: Callable[[], JournalLink | None],
                 builtin: Callable[[], list[Output]] = list):  # fmt: skip
        """`journal`: the journal's writer once it is open (None: none this run); `builtin`: the publisher and the
        journal's writer, which have sections of their own and are reported with the rest."""
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
            try:
                check_output(entry)
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise OutputRefused(("outputs", position, "path"), f"cannot open {entry.path}: {reason}") from None

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
        output = make_output(entry, self._journal())
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
