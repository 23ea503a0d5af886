"""What a running daemon is made of: the parts it keeps for its whole life (`Pipeline`), and those a configuration
change replaces (`Running`: one value, so that whoever reads it sees all of the old or all of the new)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from vigild.capture.camera import CameraCapture, Capture
from vigild.capture.clips import RecorderSettings
from vigild.capture.exchange import FrameExchange
from vigild.capture.pool import CaptureWorkers
from vigild.cluster.placement import Placement
from vigild.config.loading import Config
from vigild.outputs.bus import EventBus
from vigild.outputs.publisher import Publisher
from vigild.pipeline.chain import Chain
from vigild.pipeline.scheduler import Scheduler
from vigild.service.errors import CommandError
from vigild.service.journaling import Journaling
from vigild.service.outputs import Outputs
from vigild.service.threads import ThreadChoice

CAPTURE_JOIN_TIMEOUT_S = 2.0

T = TypeVar("T")


@dataclass(frozen=True)
class Pipeline:
    """The parts that live as long as the daemon: made once, never replaced."""

    exchange: FrameExchange
    scheduler: Scheduler
    publisher: Publisher
    device: str
    threads: ThreadChoice
    workers: CaptureWorkers | None = None
    """The capture worker processes (`capture.workers` > 0); None: capture threads in this process."""
    journaling: Journaling | None = None
    bus: EventBus = field(default_factory=EventBus)
    """Where every event goes (a part made without one, in tests, gets one of its own)."""
    outputs: Outputs | None = None
    recording_root: Path | None = None
    """Where clips go (None: no camera records)."""
    recording: Any = None
    """The daemon's recording (vigild.recording.manager.Recording), when a camera records."""
    placement: Placement | None = None
    """In a cluster: who holds which camera (vigild.cluster.placement)."""

    def recorder_settings(self, config: Config, name: str) -> RecorderSettings | None:
        settings = config.settings.camera_recording(name)
        if settings is None or self.recording_root is None:
            return None
        segment_s = settings.continuous.segment_s if settings.continuous is not None else None
        return RecorderSettings(self.recording_root, settings.pre_s, settings.encode_kbps, segment_s)

    def capture(self, config: Config, name: str) -> Capture:
        """A capture of camera `name` of `config` into the exchange (not started): in a worker, or a thread here."""
        recording = self.recorder_settings(config, name)
        if self.workers is not None:
            return self.workers.capture(name, config.cameras[name], config.source(name), recording)
        return CameraCapture(name, config.cameras[name], config.source(name), self.exchange, recording=recording)

    def on_scheduler(self, function: Callable[[], None], timeout: float) -> None:
        """Run `function` between two batches; CommandError `busy`, with `function` not run, when the scheduler
        does not come round within `timeout` (a plugin is stuck)."""
        try:
            self.scheduler.call(function, timeout)
        except TimeoutError:
            raise CommandError(
                "busy", "the scheduler did not come round (a plugin is stuck); nothing changed"
            ) from None


@dataclass(frozen=True)
class Running:
    """What a configuration change (a reload, a camera added, removed, paused or resumed) replaces, as one value."""

    config: Config
    chain: Chain
    captures: Mapping[str, Capture]
    """Of every enabled camera, paused ones included (their capture is stopped)."""
    paused: frozenset[str] = frozenset()
    unheld: frozenset[str] = frozenset()
    """In a cluster: cameras this daemon does not hold the lease of (their capture is stopped, docs/cluster.md)."""
    clustered: bool = False
    """Cameras a change adds start unheld (the placement claims them)."""


@dataclass(frozen=True)
class Change(Generic[T]):
    """A change made ready: the `Running` for the daemon to commit (one assignment), the captures to start once it
    has, and what to answer."""

    running: Running
    result: T
    starting: tuple[Capture, ...] = ()
