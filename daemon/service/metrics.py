"""Prometheus `/metrics` through prometheus-client, on its own registry and HTTP thread.

Counts the daemon already keeps (frames, drops, reconnects, events sent) are read when Prometheus scrapes, so the
hot path pays nothing for them; only the two histograms are observed as the frames go: plugin time per batch and
capture-to-publish latency per frame.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vigild.capture.camera import CameraState
from vigild.config.settings import MetricsConfig

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


class StatusSource(Protocol):
    """All the metrics ask of the daemon: its status snapshot (the one the heartbeat and `vigild ctl status` show)."""

    def status(self) -> dict[str, Any]: ...


CAMERA_STATES = (*(state.value for state in CameraState), "paused")


class DaemonCollector(Collector):
    """Turns one status snapshot per scrape into metrics: the numbers are those of the heartbeat, by construction."""

    def __init__(self, source: StatusSource):
        self._source = source

    def collect(self) -> Iterator[Metric]:
        status = self._source.status()
        fps = GaugeMetricFamily("vigild_camera_fps", "Frames/s through the chain, last heartbeat interval", labels=["camera"])
        per_camera = {
            "frames": CounterMetricFamily("vigild_camera_frames", "Frames through the chain", labels=["camera"]),
            "captured": CounterMetricFamily(
                "vigild_camera_captured_frames", "Frames handed over by capture", labels=["camera"]
            ),
            "drops": CounterMetricFamily("vigild_camera_dropped_frames", "Frames dropped before the chain", labels=["camera"]),
            "reconnects": CounterMetricFamily("vigild_camera_reconnects", "Source reconnect attempts", labels=["camera"]),
            "decode_errors": CounterMetricFamily("vigild_camera_decode_errors", "Decode errors", labels=["camera"]),
            "plugin_failures": CounterMetricFamily(
                "vigild_camera_plugin_failures", "Frames a plugin failed on", labels=["camera"]
            ),
        }
        state = GaugeMetricFamily("vigild_camera_state", "1 for the camera's current state", labels=["camera", "state"])
        for name, camera in status["cameras"].items():
            fps.add_metric([name], camera["fps"])
            for key, family in per_camera.items():
                family.add_metric([name], camera[key])
            for value in CAMERA_STATES:
                state.add_metric([name, value], 1.0 if value == camera["state"] else 0.0)
        yield from (fps, *per_camera.values(), state)

        publisher = status["publisher"]
        events = CounterMetricFamily("vigild_events_published", "Events sent, by type", labels=["type"])
        for event_type, count in publisher["sent_by_type"].items():
            events.add_metric([event_type], count)
        yield events
        dropped = CounterMetricFamily("vigild_events_dropped", "Events not sent, by reason", labels=["reason"])
        dropped.add_metric(["queue_full"], publisher["dropped_queue_full"])
        dropped.add_metric(["unsendable"], publisher["dropped_unsendable"])
        yield dropped
        yield CounterMetricFamily("vigild_batches", "Batches through the chain", value=status["scheduler"]["batches"])
        plugin_failures = CounterMetricFamily("vigild_plugin_failures", "Frames a plugin failed on", labels=["plugin"])
        batch_failures = CounterMetricFamily(
            "vigild_plugin_batch_failures", "Batches a plugin raised on (whole or rerun frame by frame)", labels=["plugin"]
        )
        for plugin_id, plugin in status["plugins"].items():
            plugin_failures.add_metric([plugin_id], plugin["failures"])
            batch_failures.add_metric([plugin_id], plugin["batch_failures"])
        yield from (plugin_failures, batch_failures)
        yield GaugeMetricFamily("vigild_uptime_seconds", "Seconds since start", value=status["uptime_s"])
        memory = GaugeMetricFamily("vigild_gpu_memory_bytes", "GPU memory held by torch", labels=["device", "kind"])
        device = status["device"]
        if device.startswith("cuda"):
            import torch

            memory.add_metric([device, "allocated"], torch.cuda.memory_allocated(device))
            memory.add_metric([device, "reserved"], torch.cuda.memory_reserved(device))
        yield memory


class MetricsServer:
    def __init__(self, config: MetricsConfig, daemon: StatusSource):
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
