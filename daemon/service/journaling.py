"""The daemon's journal: opened at start beside the publisher, written on a thread of its own, served to resuming
subscribers on the replay socket, reported in the heartbeat and the metrics (docs/events.md#history).

Only a journal held by another daemon stops the start (`JournalBusy`: two writers would interleave their seq). Any
other failure to open it (an unwritable directory, a full disk, a damaged file) is one clear error: the daemon runs
and publishes, every event is counted as not journaled, the replay socket answers with that gap, and the next start
tries again. A failure to write once it is open is the writer's (vigild.outputs.journal.JournalWriter): it resumes
by itself.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

from vigild import paths
from vigild.config.settings import CurveConfig, JournalConfig
from vigild.outputs.bus import EventBus
from vigild.outputs.journal import Journal, JournalLocked, JournalWriter, default_path
from vigild.outputs.replay import ReplayError, ReplayServer

log = logging.getLogger("vigild.journal")

MB = 1 << 20


class JournalBusy(Exception):
    """Another daemon holds the journal."""


class Journaling:
    def __init__(self, config: JournalConfig, config_file: Path | None, bus: EventBus,
                 curve: CurveConfig | None):  # fmt: skip
        self.config = config
        self.path = config.path or default_path(config_file)
        self.replay_endpoint = config.replay_endpoint or paths.replay_endpoint(config_file)
        self._default_replay = config.replay_endpoint is None
        self._bus = bus
        self._curve = curve
        self.writer: JournalWriter | None = None
        self.replay: ReplayServer | None = None
        self.open_error: str | None = None

    def start(self) -> None:
        """Open the journal and attach it to the bus (before any event is published: `seq` goes on from the
        journal's last), then bind the replay socket. Raises `JournalBusy` or `ReplayError` with nothing left open."""
        if not self.config.enabled:
            return
        try:
            journal = Journal(self.path, self.config.retention_days, int(self.config.max_size_mb * MB))
        except JournalLocked as exc:
            raise JournalBusy(str(exc)) from None
        except (OSError, sqlite3.Error) as exc:
            self.open_error = f"{type(exc).__name__}: {exc}"
            log.error(
                "cannot open the event journal %s: %s; events are published but not journaled this run (no history "
                "or replay of them; counted as not journaled); fix it and restart",
                self.path,
                self.open_error,
            )
        else:
            if journal.swept:
                log.info("event journal: removed %d snapshot file(s) a stopped run left behind", journal.swept)
            self.writer = JournalWriter(journal)
            self._bus.continue_from(self.writer.through)
            self.writer.start()
            self._bus.attach(self.writer)
            log.info("event journal %s: events from seq %d on", self.path, self.writer.through + 1)
        self.replay = ReplayServer(self.replay_endpoint, self.writer, self._bus, self._curve,
                                   private_dir=self._default_replay)  # fmt: skip
        try:
            self.replay.start()
        except ReplayError:
            self.replay = None
            self.stop()
            raise

    def stop(self) -> None:
        """After the publisher has taken its last event: the writer stores what is queued."""
        if self.replay is not None:
            self.replay.stop()
        if self.writer is not None:
            self._bus.detach(self.writer)
            self.writer.stop()

    @property
    def curve(self) -> Any:
        return self.replay.curve if self.replay is not None else None

    def status(self) -> dict[str, Any]:
        """The heartbeat's `journal` section (`{"enabled": False}` when it is off)."""
        if not self.config.enabled:
            return {"enabled": False}
        replay = self.replay
        served: dict[str, Any] = {}
        if replay is not None:
            replay.ensure_running()  # a replay thread that died is started again here, once per heartbeat
            served = replay.status()
        writer = self.writer
        if writer is None:
            not_journaled = self._bus.last_seq if self.open_error is not None else 0
            return {"enabled": True, "path": str(self.path), "stored": 0, "not_journaled": not_journaled,
                    "queued": 0, "error": self.open_error, "replay": self.replay_endpoint, **served}  # fmt: skip
        return {
            "enabled": True,
            "path": str(self.path),
            "stored": writer.stored,
            "not_journaled": writer.not_journaled,
            "queued": writer.queued,
            "error": writer.error,
            "replay": self.replay_endpoint,
            **served,
        }
