"""Prometheus `/metrics` through prometheus-client, on its own registry and HTTP thread.

Everything is read when Prometheus scrapes, from what the daemon already keeps: its status snapshot (frames, drops,
reconnects, events sent) and its two histograms (plugin time per batch, capture-to-publish latency per frame), which
the pipeline counts into buckets as the frames go (vigild.pipeline.durations). Nothing here is called from the hot
path.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from vigild.capture.camera import CameraState
from vigild.config.settings import MetricsConfig
from vigild.pipeline.durations import Histogram, Timings

log = logging.getLogger("vigild.metrics")


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


class TimingSource(Protocol):
    """The histograms, as the pipeline counted them."""

    def timings(self) -> Timings: ...


class MetricsSource(StatusSource, TimingSource, Protocol):
    """All the metrics server asks of the daemon."""


CAMERA_STATES = (*(state.value for state in CameraState), "paused", "elsewhere", "unassigned")


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
        yield from _motion(status["cameras"])

        publisher = status["publisher"]
        events = CounterMetricFamily("vigild_events_published", "Events sent, by type", labels=["type"])
        for event_type, count in publisher["sent_by_type"].items():
            events.add_metric([event_type], count)
        yield events
        dropped = CounterMetricFamily("vigild_events_dropped", "Events not sent, by reason", labels=["reason"])
        dropped.add_metric(["queue_full"], publisher["dropped_queue_full"])
        dropped.add_metric(["unsendable"], publisher["dropped_unsendable"])
        yield dropped
        journal = status["journal"]
        if journal["enabled"]:
            yield CounterMetricFamily("vigild_journal_stored", "Events stored in the journal", value=journal["stored"])
            yield CounterMetricFamily(
                "vigild_journal_not_journaled",
                "Events the journal could not store (full disk, unwritable path): gaps in history and replay",
                value=journal["not_journaled"],
            )
            yield GaugeMetricFamily("vigild_journal_queued", "Events waiting for the journal", value=journal["queued"])
            yield GaugeMetricFamily(
                "vigild_journal_error", "1 while the journal cannot be written (see the log)", value=float(bool(journal["error"]))
            )
        yield from _outputs(status.get("outputs") or {})
        yield from _recording(status.get("recording") or {})
        yield CounterMetricFamily("vigild_batches", "Batches through the chain", value=status["scheduler"]["batches"])
        plugin_failures = CounterMetricFamily("vigild_plugin_failures", "Frames a plugin failed on", labels=["plugin"])
        batch_failures = CounterMetricFamily(
            "vigild_plugin_batch_failures", "Batches a plugin raised on (whole or rerun frame by frame)", labels=["plugin"]
        )
        pending = GaugeMetricFamily(
            "vigild_branch_pending",
            "Work a branch plugin has not handled yet (`unit`: frames and closings, or clips)",
            labels=["plugin", "unit"],
        )
        plugin_frames = CounterMetricFamily("vigild_plugin_frames", "Frames a plugin ran on", labels=["plugin"])
        skipped = CounterMetricFamily(
            "vigild_branch_skipped",
            "Work a branch plugin skipped to keep up (`unit`: frames replaced by a newer one of the camera, or clips "
            "it could not afford)",
            labels=["plugin", "unit"],
        )
        for plugin_id, plugin in status["plugins"].items():
            plugin_failures.add_metric([plugin_id], plugin["failures"])
            batch_failures.add_metric([plugin_id], plugin["batch_failures"])
            plugin_frames.add_metric([plugin_id], plugin["frames"])
            if "branch" in plugin:
                branch = plugin["branch"]
                pending.add_metric([plugin_id, branch["unit"]], branch["pending"])
                skipped.add_metric([plugin_id, branch["unit"]], branch["skipped"])
        yield from (plugin_failures, batch_failures, plugin_frames, pending, skipped)
        restarts = CounterMetricFamily(
            "vigild_capture_worker_restarts", "Times a capture worker process died and was restarted", labels=["worker"]
        )
        for index, worker in enumerate(status["capture"]["workers"]):
            restarts.add_metric([str(index)], worker["restarts"])
        yield restarts
        yield GaugeMetricFamily("vigild_uptime_seconds", "Seconds since start", value=status["uptime_s"])
        memory = GaugeMetricFamily("vigild_gpu_memory_bytes", "GPU memory held by torch", labels=["device", "kind"])
        device = status["device"]
        if device.startswith("cuda"):
            import torch

            memory.add_metric([device, "allocated"], torch.cuda.memory_allocated(device))
            memory.add_metric([device, "reserved"], torch.cuda.memory_reserved(device))
        yield memory


OUTPUT_STATES = ("running", "disconnected", "failed", "stopped")


def _outputs(outputs: dict[str, Any]) -> Iterator[Metric]:
    """Each output's state, lag and drops (`outputs` of the status: the ZeroMQ publisher, the journal, each entry of
    `outputs:`)."""
    state = GaugeMetricFamily("vigild_output_state", "1 for the output's current state", labels=["output", "state"])
    lag = GaugeMetricFamily("vigild_output_lag_events", "Events the output is behind the bus", labels=["output"])
    lag_s = GaugeMetricFamily(
        "vigild_output_lag_seconds", "Age of the oldest event the output has not delivered", labels=["output"]
    )
    delivered = CounterMetricFamily("vigild_output_delivered", "Events the output delivered", labels=["output"])
    drops = CounterMetricFamily(
        "vigild_output_dropped", "Events the output could not deliver, by reason", labels=["output", "reason"]
    )
    connected = GaugeMetricFamily(
        "vigild_output_connected", "1 while the output is connected to its broker", labels=["output"]
    )
    for name, output in outputs.items():
        for value in OUTPUT_STATES:
            state.add_metric([name, value], 1.0 if value == output.get("state") else 0.0)
        lag.add_metric([name], output.get("lag_events", 0))
        lag_s.add_metric([name], output.get("lag_s", 0.0))
        if "delivered" in output:
            delivered.add_metric([name], output["delivered"])
        for reason, count in (output.get("drops") or {}).items():
            drops.add_metric([name, reason], count)
        if "connected" in output:
            connected.add_metric([name], float(bool(output["connected"])))
    yield from (state, lag, lag_s, delivered, drops, connected)


def _motion(cameras: dict[str, Any]) -> Iterator[Metric]:
    """Each gated camera's `motion` (docs/motion.md#status-and-metrics); nothing when no camera has `motion:`."""
    gated = {name: camera["motion"] for name, camera in cameras.items() if "motion" in camera}
    if not gated:
        return
    frames = CounterMetricFamily("vigild_motion_frames", "Frames of cameras with motion gating, by what was done "
                                 "(detected, gated)", labels=["camera", "result"])  # fmt: skip
    fraction = GaugeMetricFamily("vigild_motion_fraction", "Share of the last frame that moved", labels=["camera"])
    crops = GaugeMetricFamily("vigild_motion_crops_per_frame", "Crops per detected frame (detect: regions)",
                              labels=["camera"])  # fmt: skip
    changes = CounterMetricFamily("vigild_motion_global_changes", "Frames on which most of the picture changed at "
                                  "once (background taken anew)", labels=["camera"])  # fmt: skip
    for name, motion in gated.items():
        frames.add_metric([name, "detected"], motion["detected"])
        frames.add_metric([name, "gated"], motion["gated"])
        fraction.add_metric([name], motion["fraction"])
        crops.add_metric([name], motion["crops_per_frame"])
        changes.add_metric([name], motion["global_changes"])
    yield from (frames, fraction, crops, changes)


def _recording(recording: dict[str, Any]) -> Iterator[Metric]:
    """The heartbeat's `recording` (docs/recording.md#status-and-metrics); nothing when no camera records."""
    if "saved" not in recording:
        return
    clips = CounterMetricFamily("vigild_recording_clips", "Clips and segments by result", labels=["result"])
    for result in ("saved", "segments", "expired", "repaired"):
        clips.add_metric([result], recording.get(result, 0))
    clips.add_metric(["dropped"], sum((recording.get("dropped") or {}).values()))
    dropped = CounterMetricFamily("vigild_recording_dropped", "Clips dropped, by reason", labels=["reason"])
    for reason, count in (recording.get("dropped") or {}).items():
        dropped.add_metric([reason], count)
    size = GaugeMetricFamily("vigild_recording_bytes", "Bytes of the clips and segments on disk")
    size.add_metric([], recording.get("bytes", 0))
    writing = GaugeMetricFamily("vigild_recording_writing", "Clips and segments being written")
    writing.add_metric([], recording.get("writing", 0))
    yield from (clips, dropped, size, writing)


def _histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    """`histogram` as prometheus-client's own Histogram shows it: buckets, count, sum, and `_created`."""
    bounds = [*(floatToGoString(bound) for bound in histogram.bounds), "+Inf"]
    family.add_metric(labels, list(zip(bounds, histogram.cumulative, strict=True)), histogram.sum_s)
    family.samples.append(
        Sample(f"{family.name}_created", dict(zip(family._labelnames, labels, strict=True)), histogram.created)
    )


class TimingCollector(Collector):
    """The latency and plugin-time histograms, read from the pipeline's counts at each scrape."""

    def __init__(self, source: TimingSource):
        self._source = source

    def collect(self) -> Iterator[Metric]:
        timings = self._source.timings()
        plugin = HistogramMetricFamily("vigild_plugin_seconds", "Time of one plugin over one batch", labels=["plugin"])
        for plugin_id, histogram in timings.plugins.items():
            _histogram(plugin, [plugin_id], histogram)
        latency = HistogramMetricFamily("vigild_latency_seconds", "Capture to publish, per frame", labels=[])
        _histogram(latency, [], timings.latency)
        yield from (plugin, latency)


class MetricsServer:
    def __init__(self, config: MetricsConfig, daemon: MetricsSource):
        self.config = config
        self.registry = CollectorRegistry()
        self.registry.register(TimingCollector(daemon))
        self.registry.register(DaemonCollector(daemon))
        self._server: Any = None
        self.port = config.port

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
