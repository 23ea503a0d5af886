"""Prometheus `/metrics` through prometheus-client, on its own registry and HTTP thread.

Counts the daemon already keeps (frames, drops, reconnects, events sent) are read when Prometheus scrapes, so the
hot path pays nothing for them; only the two histograms are observed as the frames go: plugin time per batch and
capture-to-publish latency per frame.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vigild.capture import CameraState
from vigild.chain import failures_by_camera
from vigild.config import MetricsConfig

if TYPE_CHECKING:
    from vigild.daemon import Daemon

log = logging.getLogger("vigild.metrics")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
PLUGIN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def is_loopback_address(address: str) -> bool:
    """`localhost` or a loopback IP; anything else (`0.0.0.0`, `::`, `""`, a host name) may be reachable."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class DaemonCollector(Collector):
    """Reads the daemon's own counters at scrape time."""

    def __init__(self, daemon: Daemon):
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        daemon = self._daemon
        captures = daemon.captures
        processed = dict(daemon.scheduler.processed)
        fps = GaugeMetricFamily("vigild_camera_fps", "Frames/s through the chain, last heartbeat interval", labels=["camera"])
        frames = CounterMetricFamily("vigild_camera_frames", "Frames through the chain", labels=["camera"])
        captured = CounterMetricFamily("vigild_camera_captured_frames", "Frames handed over by capture", labels=["camera"])
        drops = CounterMetricFamily("vigild_camera_dropped_frames", "Frames dropped before the chain", labels=["camera"])
        reconnects = CounterMetricFamily("vigild_camera_reconnects", "Source reconnect attempts", labels=["camera"])
        errors = CounterMetricFamily("vigild_camera_decode_errors", "Decode errors", labels=["camera"])
        failures = CounterMetricFamily("vigild_camera_plugin_failures", "Frames a plugin failed on", labels=["camera"])
        state = GaugeMetricFamily(
            "vigild_camera_state", "1 for the camera's current state", labels=["camera", "state"]
        )
        failed = failures_by_camera(daemon.chain)
        states = [s.value for s in CameraState] + ["paused"]
        for name, capture in captures.items():
            stats = capture.stats
            fps.add_metric([name], daemon.camera_fps.get(name, (0.0, 0.0))[0])
            frames.add_metric([name], processed.get(name, 0))
            captured.add_metric([name], stats.frames_delivered)
            drops.add_metric([name], daemon.exchange.drops[name] + stats.source_drops)
            reconnects.add_metric([name], stats.reconnects)
            errors.add_metric([name], stats.decode_errors)
            failures.add_metric([name], failed.get(name, 0))
            current = "paused" if name in daemon.paused else stats.state.value
            for value in states:
                state.add_metric([name, value], 1.0 if value == current else 0.0)
        yield from (fps, frames, captured, drops, reconnects, errors, failures, state)

        publisher = daemon.publisher.stats
        events = CounterMetricFamily("vigild_events_published", "Events sent, by type", labels=["type"])
        for event_type, count in sorted(publisher.sent_by_type.items()):
            events.add_metric([event_type], count)
        yield events
        dropped = CounterMetricFamily("vigild_events_dropped", "Events not sent, by reason", labels=["reason"])
        dropped.add_metric(["queue_full"], publisher.dropped_queue_full)
        dropped.add_metric(["unsendable"], publisher.dropped_unsendable)
        yield dropped
        yield CounterMetricFamily("vigild_batches", "Batches through the chain", value=daemon.scheduler.batches)
        plugin_failures = CounterMetricFamily("vigild_plugin_failures", "Frames a plugin failed on", labels=["plugin"])
        batch_failures = CounterMetricFamily(
            "vigild_plugin_batch_failures", "Batches a plugin raised on (whole or rerun frame by frame)", labels=["plugin"]
        )
        for stage in daemon.chain.stages:
            plugin_failures.add_metric([stage.spec.id], stage.total_failures)
            batch_failures.add_metric([stage.spec.id], stage.batch_failures)
        yield from (plugin_failures, batch_failures)
        yield GaugeMetricFamily("vigild_uptime_seconds", "Seconds since start", value=daemon.uptime_s)
        memory = GaugeMetricFamily("vigild_gpu_memory_bytes", "GPU memory held by torch", labels=["device", "kind"])
        if daemon.device.startswith("cuda"):
            import torch

            memory.add_metric([daemon.device, "allocated"], torch.cuda.memory_allocated(daemon.device))
            memory.add_metric([daemon.device, "reserved"], torch.cuda.memory_reserved(daemon.device))
        yield memory


class MetricsServer:
    def __init__(self, config: MetricsConfig, daemon: Daemon):
        self.config = config
        self.registry = CollectorRegistry()
        self._plugin = Histogram(
            "vigild_plugin_seconds", "Time of one plugin over one batch", ["plugin"], registry=self.registry,
            buckets=PLUGIN_BUCKETS,
        )  # fmt: skip
        self._latency = Histogram(
            "vigild_latency_seconds", "Capture to publish, per frame", registry=self.registry, buckets=LATENCY_BUCKETS
        )
        self.registry.register(DaemonCollector(daemon))
        self._server: Any = None
        self.port = config.port

    def plugin_seconds(self, plugin_id: str, seconds: float) -> None:
        self._plugin.labels(plugin_id).observe(seconds)

    def latency_seconds(self, seconds: float) -> None:
        self._latency.observe(seconds)

    def start(self) -> None:
        """Bind and serve (raises OSError when the port is taken)."""
        if not is_loopback_address(self.config.address):
            log.warning(
                "INSECURE: metrics served on %s:%d, reachable from other machines, without authentication: anyone "
                "who can connect reads camera names, states and counts; bind 127.0.0.1 and scrape through a proxy "
                "that authenticates (docs/security.md)",
                self.config.address,
                self.config.port,
            )
        self._server, _ = start_http_server(self.config.port, self.config.address, registry=self.registry)
        self.port = self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
