"""The daemon's state as one snapshot: the heartbeat, `vigild ctl status`, systemd's `STATUS=` line and the metrics
are all made from `snapshot()`, so they never disagree on a count. Beside it: the heartbeat's thread and its
rates, the metrics' histograms, and the camera list with its secrets masked."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from vigild.capture.camera import CameraState, Capture
from vigild.config.loading import Config
from vigild.config.sources import redact
from vigild.events import Event
from vigild.lifecycle import ServiceThread
from vigild.pipeline.chain import Chain, Stage, failures_by_camera
from vigild.pipeline.durations import Timings
from vigild.service.running import Pipeline, Running
from vigild.service.threads import thread_report

log = logging.getLogger("vigild")


def status_line(status: Mapping[str, Any]) -> str:
    """One line for systemd's STATUS= from a `snapshot()`."""
    cameras = status["cameras"].values()
    streaming = sum(1 for camera in cameras if camera["state"] == CameraState.STREAMING.value)
    paused = sum(1 for camera in cameras if camera["state"] == "paused")
    elsewhere = sum(1 for camera in cameras if camera["state"] == "elsewhere")
    fps = sum(camera["fps"] for camera in cameras)
    drops = sum(camera["drops"] for camera in cameras)
    shown = (f", {paused} paused" if paused else "") + (f", {elsewhere} held elsewhere" if elsewhere else "")
    return f"{streaming}/{len(cameras)} cameras streaming{shown}, {fps:.1f} frames/s, {drops} dropped"


class Rates:
    """Over the last heartbeat interval: (processed, captured) frames/s of each camera, and (frames/s, busy
    fraction) of each plugin (a branch's busy fraction near 1 says it is the one that cannot keep up)."""

    def __init__(self) -> None:
        self._last: tuple[float, dict[str, int], dict[str, int]] = (time.monotonic(), {}, {})
        self._stages: dict[str, tuple[int, float]] = {}
        self.by_camera: dict[str, tuple[float, float]] = {}
        self.by_plugin: dict[str, tuple[float, float]] = {}

    def update(self, processed: Mapping[str, int], captures: Mapping[str, Capture], chain: Chain) -> None:
        """At a heartbeat: the rates since the previous one."""
        now = time.monotonic()
        previous_at, previous_processed, previous_read = self._last
        elapsed = max(now - previous_at, 1e-6)
        processed = dict(processed)
        read = {name: c.stats.frames_decoded for name, c in captures.items()}
        self._last = (now, processed, read)
        self.by_camera = {
            name: (
                round((processed.get(name, 0) - previous_processed.get(name, 0)) / elapsed, 2),
                round((read[name] - previous_read.get(name, read[name])) / elapsed, 2),
            )
            for name in captures
        }
        stages = {stage.spec.id: (stage.frames, stage.seconds) for stage in chain.stages}
        self.by_plugin = {
            plugin_id: (
                round((frames - self._stages.get(plugin_id, (frames, seconds))[0]) / elapsed, 2),
                round(min(1.0, (seconds - self._stages.get(plugin_id, (frames, seconds))[1]) / elapsed), 3),
            )
            for plugin_id, (frames, seconds) in stages.items()
        }
        self._stages = stages


def snapshot(running: Running, pipeline: Pipeline, rates: Rates, uptime_s: float) -> dict[str, Any]:
    """The daemon's state as the heartbeat and `vigild ctl status` report it."""
    scheduler, exchange = pipeline.scheduler, pipeline.exchange
    chain = running.chain
    failures = failures_by_camera(chain)
    processed = dict(scheduler.processed)
    camera_fps = rates.by_camera
    motion = scheduler.gate.counts()
    cameras: dict[str, Any] = {}
    for name, capture in running.captures.items():
        stats = capture.stats
        fps, capture_fps = camera_fps.get(name, (0.0, 0.0))
        cameras[name] = {
            "state": "paused" if name in running.paused else stats.state.value,
            "backend": stats.backend,
            "decoder": stats.decoder,
            "fps": fps,
            "capture_fps": capture_fps,
            "frames": processed.get(name, 0),
            "captured": stats.frames_delivered,
            "drops": exchange.drops[name] + stats.source_drops,
            "decode_errors": stats.decode_errors,
            "reconnects": stats.reconnects,
            "plugin_failures": failures.get(name, 0),
            "latency_ms": round(scheduler.last_latency_s.get(name, 0.0) * 1000, 1),
            "last_error": stats.last_error,
            "worker": capture.worker,
        }
        if name in motion:
            cameras[name]["motion"] = motion[name]
    placement = pipeline.placement
    if placement is not None:  # a camera another member holds is not down: it is `elsewhere`
        for name, entry in cameras.items():
            entry["holder"] = placement.holder_of(name)
            if name in running.unheld and entry["state"] != "paused":
                entry["state"] = "elsewhere" if entry["holder"] is not None else "unassigned"
    batches = scheduler.batches
    publisher = pipeline.publisher.stats
    report: dict[str, Any] = {
        "uptime_s": round(uptime_s, 1),
        "device": pipeline.device,
        "threads": thread_report(pipeline.threads),
        "config": str(running.config.file),
        "cameras": cameras,
        "capture": {"workers": pipeline.workers.status() if pipeline.workers is not None else []},
        "scheduler": {
            "waiting": exchange.waiting,
            "batches": batches,
            "mean_batch": round(scheduler.frames_in_batches / batches, 2) if batches else 0.0,
            "pipelined": scheduler.pipelined,
        },
        "plugins": {
            stage.spec.id: {
                "frames": stage.frames,
                "fps": rates.by_plugin.get(stage.spec.id, (0.0, 0.0))[0],
                "busy": rates.by_plugin.get(stage.spec.id, (0.0, 0.0))[1],
                "seconds": round(stage.seconds, 3),
                "failures": stage.total_failures,
                "batch_failures": stage.batch_failures,
                "instances": len(stage.instances),
                **branch_report(chain, stage),
            }
            for stage in chain.stages
        },
        "plugin_instances": {  # control.max_instances: what control clients' changes may add
            "count": sum(len(stage.instances) for stage in chain.stages),
            "limit": running.config.instance_limit,
        },
        "publisher": {
            "sent": publisher.sent,
            "sent_by_type": dict(sorted(publisher.sent_by_type.items())),
            "dropped_queue_full": publisher.dropped_queue_full,
            "dropped_unsendable": publisher.dropped_unsendable,
            "last_seq": pipeline.bus.last_seq,
        },
        "journal": pipeline.journaling.status() if pipeline.journaling is not None else {"enabled": False},
        "outputs": pipeline.outputs.status() if pipeline.outputs is not None else {},
        "recording": pipeline.recording.status() if pipeline.recording is not None else {"enabled": False},
    }
    if placement is not None:
        cluster = placement.status()
        waiting = [name for name in cluster["held"] if cameras.get(name, {}).get("state") not in ("streaming", "paused")]
        # ready (Kubernetes' probe): registered, and every camera it holds streams (or was paused on purpose)
        cluster.update(ready=cluster["ready"] and not waiting, not_streaming=waiting, fenced=pipeline.bus.fenced)
        report["cluster"] = cluster
    return report


def branch_report(chain: Chain, stage: Stage) -> dict[str, Any]:
    """For a plugin that runs beside the chain: `branch` with what it holds (`pending`: frames and closings, or
    clips, not handled yet), the work it skipped to keep up (frames replaced by a newer one of the camera, or clips
    it could not afford), what those count (`unit`), its busy time and, for one in processes of its own
    (`branch: process`), their `pids`; nothing for a plugin in the chain."""
    works = chain.branch_work(stage)
    if not works:
        return {}
    return {
        "branch": {
            "unit": works[0].unit,
            "pending": sum(work.pending for work in works),
            "skipped": sum(work.skipped_total for work in works),
            "busy_s": round(sum(work.busy_s for work in works), 3),
            **({"pids": pids} if (pids := [pid for work in works if (pid := work.pid) is not None]) else {}),
        }
    }


def timings(running: Running, pipeline: Pipeline) -> Timings:
    """The histograms the metrics show: the scheduler's latency and each plugin's time per batch."""
    plugins = {stage.spec.id: stage.durations.read() for stage in running.chain.stages}
    return Timings(pipeline.scheduler.latency.read(), plugins)


def camera_list(config: Config, states: Mapping[str, Any]) -> dict[str, Any]:
    """Each configured camera's config (passwords and credentials in the source masked) and state (`states`: the
    snapshot's cameras; a camera not there is disabled)."""
    listed = {}
    for name, camera in config.settings.cameras.items():
        shown = camera.model_dump(mode="json", exclude_defaults=True)
        if "password" in shown:
            shown["password"] = "********"
        shown["source"] = redact(shown["source"])
        listed[name] = {"config": shown, "state": states.get(name, {}).get("state", "disabled")}
    return listed


class Heartbeat:
    """A thread that publishes `make()` every `interval` seconds until `stop()`; a heartbeat that cannot be made is
    logged and skipped, never the end of the beats."""

    def __init__(self, interval: float, make: Callable[[], Event], publish: Callable[[Event], None]):
        self.interval = interval
        self._make = make
        self._publish = publish
        self._thread = ServiceThread("heartbeat", self._run)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop(timeout=10.0)

    def _run(self, thread: ServiceThread) -> None:
        thread.ready()
        due = time.monotonic() + self.interval
        while not thread.stopping.wait(max(0.0, due - time.monotonic())):
            due += self.interval
            if due < time.monotonic():  # we fell behind: do not burst to catch up
                due = time.monotonic() + self.interval
            try:
                self._publish(self._make())
            except Exception:  # a broken heartbeat must not take the event stream down with it
                log.exception("could not make the heartbeat")
