"""The daemon: wires capture → exchange → scheduler/chain → publisher, and stops them in that order."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from vigild.capture import CameraCapture, CameraState
from vigild.chain import Chain, failures_by_camera
from vigild.config import Config
from vigild.events import SYSTEM_CAMERA, Event
from vigild.exchange import FrameExchange
from vigild.publisher import Publisher
from vigild.scheduler import Scheduler

log = logging.getLogger("vigild")

CAPTURE_JOIN_TIMEOUT_S = 2.0
SCHEDULER_JOIN_TIMEOUT_S = 10.0


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        settings = config.settings
        from vigild.device import resolve_device  # imports torch: only once a daemon is made

        self.device = resolve_device(settings.device)
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        self.exchange = FrameExchange()
        self.captures = {
            name: CameraCapture(name, cam, config.source(name), self.exchange) for name, cam in config.cameras.items()
        }
        self.chain = Chain(config.chain, self.device, config.cameras, settings.torch_threads)
        self.publisher = Publisher(settings.publisher, heartbeat=self._heartbeat)
        self.scheduler = Scheduler(
            settings.scheduler,
            self.exchange,
            self.chain,
            self.publisher,
            list(self.captures),
            self._streaming_count,
            self.request_stop,
        )
        self._stop_requested = threading.Event()
        self._started_at = time.monotonic()
        self._last_beat: tuple[float, dict[str, int], dict[str, int]] = (self._started_at, {}, {})

    def start(self) -> None:
        """Start everything, or raise with nothing left running (a bad plugin, a busy port)."""
        # bind first: subscribers waiting to connect get in while the models load, and miss no early event
        self.publisher.start()
        try:
            self.chain.start()
        except Exception:
            self.publisher.stop()
            raise
        self.scheduler.start()
        for capture in self.captures.values():
            capture.start()
        log.info(
            "running %d camera(s) on %s, publishing on %s",
            len(self.captures),
            self.device,
            self.config.settings.publisher.endpoint,
        )

    def request_stop(self) -> None:
        """Safe from any thread and from signal handlers: `wait()` returns and the owner calls `stop()`."""
        self._stop_requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop_requested.wait(timeout)

    def stop(self) -> None:
        for capture in self.captures.values():
            capture.stop()
        self.exchange.close()
        self.scheduler.stop(SCHEDULER_JOIN_TIMEOUT_S)
        if self.scheduler.is_alive():
            log.error(
                "a plugin is still busy after %.0f s: stopping without its closing events", SCHEDULER_JOIN_TIMEOUT_S
            )
        self.chain.stop()
        self.publisher.stop()
        deadline = time.monotonic() + CAPTURE_JOIN_TIMEOUT_S
        for capture in self.captures.values():
            capture.join(max(0.0, deadline - time.monotonic()))
            if capture.is_alive():
                log.warning(
                    "camera %s did not stop within %.0f s (blocked in its source)", capture.name, CAPTURE_JOIN_TIMEOUT_S
                )
        log.info("stopped")

    def _streaming_count(self) -> int:
        return sum(1 for c in self.captures.values() if c.stats.state is CameraState.STREAMING)

    def _heartbeat(self) -> Event:
        """Called on the publisher thread once per `heartbeat_interval`; rates are over the last interval."""
        now = time.monotonic()
        previous_at, previous_processed, previous_read = self._last_beat
        elapsed = max(now - previous_at, 1e-6)
        processed = dict(self.scheduler.processed)
        read = {name: c.stats.frames_decoded for name, c in self.captures.items()}
        self._last_beat = (now, processed, read)
        failures = failures_by_camera(self.chain)
        cameras: dict[str, Any] = {}
        for name, capture in self.captures.items():
            stats = capture.stats
            cameras[name] = {
                "state": stats.state.value,
                "backend": stats.backend,
                "decoder": stats.decoder,
                "fps": round((processed.get(name, 0) - previous_processed.get(name, 0)) / elapsed, 2),
                "capture_fps": round((read[name] - previous_read.get(name, 0)) / elapsed, 2),
                "frames": processed.get(name, 0),
                "captured": stats.frames_delivered,
                "drops": self.exchange.drops[name] + stats.source_drops,
                "decode_errors": stats.decode_errors,
                "reconnects": stats.reconnects,
                "plugin_failures": failures.get(name, 0),
                "latency_ms": round(self.scheduler.last_latency_s.get(name, 0.0) * 1000, 1),
                "last_error": stats.last_error,
            }
        batches = self.scheduler.batches
        publisher = self.publisher.stats
        return Event(
            "heartbeat",
            SYSTEM_CAMERA,
            time.time(),
            data={
                "uptime_s": round(now - self._started_at, 1),
                "device": self.device,
                "cameras": cameras,
                "scheduler": {
                    "batches": batches,
                    "mean_batch": round(self.scheduler.frames_in_batches / batches, 2) if batches else 0.0,
                },
                "plugins": {stage.spec.id: {"seconds": round(stage.seconds, 3)} for stage in self.chain.stages},
                "publisher": {
                    "sent": publisher.sent,
                    "dropped_queue_full": publisher.dropped_queue_full,
                    "dropped_unsendable": publisher.dropped_unsendable,
                },
            },
        )
