"""The daemon: wires capture → exchange → scheduler/chain → publisher, and stops them in that order.

It also owns what a service needs around that flow: the systemd notifications and watchdog, the control socket,
the Prometheus endpoint, and configuration changes (a reload, or cameras added, removed, paused) applied as a
diff, so that cameras and plugins that did not change run on without a gap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from vigild.capture.camera import CameraCapture, CameraState
from vigild.capture.sources import redact
from vigild.config.loading import Config, ConfigError, load_config, with_camera
from vigild.config.yamlsource import KeyPath
from vigild.events import SYSTEM_CAMERA, Event
from vigild.outputs.publisher import Publisher, PublisherError
from vigild.pipeline.chain import Chain, PluginStartError, failures_by_camera
from vigild.pipeline.exchange import FrameExchange
from vigild.pipeline.scheduler import Scheduler
from vigild.plugin import PluginConfigError
from vigild.service.control import CommandError, ControlServer
from vigild.service.notify import ServiceNotifier
from vigild.service.threads import apply_threads, choose_threads, thread_report

log = logging.getLogger("vigild")

CAPTURE_JOIN_TIMEOUT_S = 2.0
SCHEDULER_JOIN_TIMEOUT_S = 6.0
"""With the captures' 2 s and the publisher's linger, a stop ends well within systemd's 10 s expectation."""
RESTART_REQUIRED = ("publisher", "control", "curve", "metrics", "device", "torch_threads")
"""Settings a reload cannot change in a running process (sockets, the compute device): they wait for a restart."""


class BindError(Exception):
    """A socket or port the config names could not be bound (taken, no permission); `key` is where it is set."""

    def __init__(self, key: KeyPath, message: str):
        self.key = key
        super().__init__(message)


@dataclass
class Applied:
    """What a reload or a camera command changed."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    plugins_kept: list[str] = field(default_factory=list)
    plugins_started: list[str] = field(default_factory=list)
    plugins_stopped: list[str] = field(default_factory=list)
    restart_required: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cameras": {
                "added": self.added,
                "removed": self.removed,
                "restarted": self.restarted,
                "unchanged": self.unchanged,
            },
            "plugins": {"kept": self.plugins_kept, "started": self.plugins_started, "stopped": self.plugins_stopped},
            "restart_required": self.restart_required,
        }


def status_line(status: Mapping[str, Any]) -> str:
    """One line for systemd's STATUS= from a `Daemon.status()` snapshot."""
    cameras = status["cameras"].values()
    streaming = sum(1 for camera in cameras if camera["state"] == CameraState.STREAMING.value)
    paused = sum(1 for camera in cameras if camera["state"] == "paused")
    fps = sum(camera["fps"] for camera in cameras)
    drops = sum(camera["drops"] for camera in cameras)
    shown = f", {paused} paused" if paused else ""
    return f"{streaming}/{len(cameras)} cameras streaming{shown}, {fps:.1f} frames/s, {drops} dropped"


class Daemon:
    def __init__(self, config: Config, log_level_override: str | None = None):
        """`log_level_override`: the level given on the command line, which configs applied later never change."""
        self.config = config
        self._log_level_override = log_level_override
        settings = config.settings
        from vigild.vision.device import resolve_device  # imports torch: only once a daemon is made

        self.device = resolve_device(settings.device)
        # torch_threads, else the CPUs this process may use; never OMP_NUM_THREADS left by whoever started us
        self.threads = choose_threads(settings.torch_threads)
        apply_threads(self.threads)
        self.exchange = FrameExchange()
        self.captures = {name: self._capture(config, name) for name in config.cameras}
        self.paused: set[str] = set()
        self.chain = Chain(config.chain, self.device, config.cameras, self.threads.count)
        self.publisher = Publisher(settings.publisher, heartbeat=self._heartbeat, curve=settings.curve)
        self.scheduler = Scheduler(
            settings.scheduler,
            self.exchange,
            self.chain,
            self.publisher,
            list(self.captures),
            self._streaming_count,
            self.request_stop,
        )
        self.notifier = ServiceNotifier(self.healthy, self.status_line)
        self.control = ControlServer(settings.control, settings.curve, self) if settings.control.enabled else None
        self.metrics: Any = None
        if settings.metrics.enabled:
            from vigild.service.metrics import MetricsServer

            self.metrics = MetricsServer(settings.metrics, self)
            self.chain.on_stage_time = self.metrics.plugin_seconds
            self.scheduler.on_latency = self.metrics.latency_seconds
        self._stop_requested = threading.Event()
        self._reconfiguring = threading.Lock()
        self._running = threading.Event()
        """Set once `start` has started the captures: a change before that would race it (a camera started twice)."""
        self._started_at = time.monotonic()
        self._last_beat: tuple[float, dict[str, int], dict[str, int]] = (self._started_at, {}, {})
        self.camera_fps: dict[str, tuple[float, float]] = {}
        """(processed, captured) frames/s of each camera over the last heartbeat interval."""

    def _capture(self, config: Config, name: str) -> CameraCapture:
        return CameraCapture(name, config.cameras[name], config.source(name), self.exchange)

    def start(self) -> None:
        """Start everything, or raise with nothing left running: PluginStartError for a plugin, BindError for a
        socket or port."""
        import zmq

        # bind first: subscribers waiting to connect get in while the models load, and miss no early event
        try:
            self.publisher.start()
        except PublisherError as exc:
            raise BindError(("publisher", "endpoint"), str(exc)) from exc
        started: list[Any] = [self.publisher]
        try:
            if self.control is not None:
                try:
                    self.control.start()
                except (OSError, zmq.ZMQError) as exc:
                    raise BindError(("control", "endpoint"), f"cannot bind {self.control.endpoint}: {exc}") from exc
                started.append(self.control)
            if self.metrics is not None:
                try:
                    self.metrics.start()
                except OSError as exc:
                    address = f"{self.metrics.config.address}:{self.metrics.config.port}"
                    raise BindError(("metrics", "port"), f"cannot serve metrics on {address}: {exc}") from exc
                started.append(self.metrics)
            self.chain.start()
            apply_threads(self.threads)  # again: importing ultralytics, for one, sets cv2.setNumThreads(0)
        except Exception:
            for part in reversed(started):
                part.stop()
            raise
        self.publisher.await_subscribers(self._stop_requested)
        self.scheduler.start()
        with self._reconfiguring:  # a change that got the lock before this point has answered `busy`
            for capture in self.captures.values():
                capture.start()
            self._running.set()
        log.info(
            "running %d camera(s) on %s (%d threads, %s), publishing on %s%s",
            len(self.captures),
            self.device,
            self.threads.count,
            "torch_threads" if self.threads.source == "torch_threads" else f"{self.threads.usable_cpus} usable CPUs",
            self.config.settings.publisher.endpoint,
            f", control on {self.control.endpoint}" if self.control is not None else "",
        )
        self.notifier.start()

    def request_stop(self) -> None:
        """Safe from any thread and from signal handlers: `wait()` returns and the owner calls `stop()`."""
        self._stop_requested.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stop_requested.wait(timeout)

    def stop(self) -> None:
        """Stop capture, finish the batch in flight, publish the closing events, close the sockets."""
        self._stop_requested.set()  # changes still waiting for the lock give up
        self.notifier.stopping()
        if self.control is not None:
            self.control.stop()
        with self._reconfiguring:
            for capture in self.captures.values():
                capture.stop()
            self.exchange.close()
            self.scheduler.stop(SCHEDULER_JOIN_TIMEOUT_S)
            if self.scheduler.is_alive():
                log.error(
                    "a plugin is still busy after %.0f s: stopping without its closing events",
                    SCHEDULER_JOIN_TIMEOUT_S,
                )
            else:
                self.chain.stop()
            self.publisher.stop()
            if self.metrics is not None:
                self.metrics.stop()
            deadline = time.monotonic() + CAPTURE_JOIN_TIMEOUT_S
            for capture in self.captures.values():
                capture.join(max(0.0, deadline - time.monotonic()))
                if capture.is_alive():
                    log.warning(
                        "camera %s did not stop within %.0f s (blocked in its source)",
                        capture.name,
                        CAPTURE_JOIN_TIMEOUT_S,
                    )
        log.info("stopped")

    # ----- health

    def healthy(self, max_age_s: float) -> bool:
        """The scheduler and the publisher both went round their loops within `max_age_s` (the watchdog asks)."""
        now = time.monotonic()
        publisher_age = max(max_age_s, 2 * self.config.settings.publisher.heartbeat_interval)
        return now - self.scheduler.alive_at < max_age_s and now - self.publisher.alive_at < publisher_age

    def status_line(self) -> str:
        """systemd's STATUS=, from the same snapshot as the heartbeat, `vigild ctl status` and the metrics."""
        return status_line(self.status())

    def _streaming_count(self) -> int:
        return sum(1 for c in self.captures.values() if c.stats.state is CameraState.STREAMING)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started_at

    def status(self) -> dict[str, Any]:
        """The daemon's state as the heartbeat and `vigild ctl status` report it."""
        failures = failures_by_camera(self.chain)
        processed = dict(self.scheduler.processed)
        cameras: dict[str, Any] = {}
        for name, capture in self.captures.items():
            stats = capture.stats
            fps, capture_fps = self.camera_fps.get(name, (0.0, 0.0))
            cameras[name] = {
                "state": "paused" if name in self.paused else stats.state.value,
                "backend": stats.backend,
                "decoder": stats.decoder,
                "fps": fps,
                "capture_fps": capture_fps,
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
        return {
            "uptime_s": round(self.uptime_s, 1),
            "device": self.device,
            "threads": thread_report(self.threads),
            "config": str(self.config.file),
            "cameras": cameras,
            "scheduler": {
                "batches": batches,
                "mean_batch": round(self.scheduler.frames_in_batches / batches, 2) if batches else 0.0,
            },
            "plugins": {
                stage.spec.id: {
                    "seconds": round(stage.seconds, 3),
                    "failures": stage.total_failures,
                    "batch_failures": stage.batch_failures,
                }
                for stage in self.chain.stages
            },
            "publisher": {
                "sent": publisher.sent,
                "sent_by_type": dict(sorted(publisher.sent_by_type.items())),
                "dropped_queue_full": publisher.dropped_queue_full,
                "dropped_unsendable": publisher.dropped_unsendable,
            },
        }

    def _heartbeat(self) -> Event:
        """Called on the publisher thread once per `heartbeat_interval`; rates are over the last interval."""
        now = time.monotonic()
        previous_at, previous_processed, previous_read = self._last_beat
        elapsed = max(now - previous_at, 1e-6)
        processed = dict(self.scheduler.processed)
        captures = self.captures
        read = {name: c.stats.frames_decoded for name, c in captures.items()}
        self._last_beat = (now, processed, read)
        self.camera_fps = {
            name: (
                round((processed.get(name, 0) - previous_processed.get(name, 0)) / elapsed, 2),
                round((read[name] - previous_read.get(name, read[name])) / elapsed, 2),
            )
            for name in captures
        }
        return Event("heartbeat", SYSTEM_CAMERA, time.time(), data=self.status())

    # ----- configuration changes (control thread or main thread; one at a time)

    def reload(self) -> Applied:
        """Read the config file again and apply it as a diff; an invalid file raises and changes nothing."""
        log.info("reloading %s", self.config.file)
        self.notifier.reloading()
        try:
            try:
                applied = self.apply(load_config(self.config.file))
            except (ConfigError, CommandError) as exc:
                log.error("reload refused, still running the previous config: %s", exc)
                raise
            for part in (self.publisher.curve, self.control.curve if self.control is not None else None):
                if part is not None:
                    part.reload_keys()
            return applied
        finally:
            self.notifier.reloaded()

    def set_camera(self, name: str, camera: dict[str, Any] | None) -> Applied:
        """Add or replace camera `name` (raw config, as in YAML), or remove it (None); until the next reload."""
        if camera is None and name not in self.config.settings.cameras:
            raise CommandError("unknown_camera", f"no camera named {name!r}")
        try:
            return self.apply(with_camera(self.config, name, camera))
        except ConfigError as exc:  # once, without a traceback: the client's reply says the same
            log.error("camera %s: change refused, still running the previous config: %s", name, exc)
            raise

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """One configuration change at a time; CommandError `busy` when another one (a reload loading a model)
        holds on past `control.timeout`, so that nobody waits without end."""
        if not self._reconfiguring.acquire(timeout=self.config.settings.control.timeout):
            raise CommandError("busy", "another reload or camera change is under way; nothing changed, try again")
        try:
            if self._stop_requested.is_set():  # a change that waited for the lock while the daemon stopped
                raise CommandError("busy", "the daemon is stopping; nothing changed")
            if not self._running.is_set():  # the control socket answers while models load and subscribers join
                raise CommandError(
                    "busy", "the daemon is still starting (loading models or awaiting subscribers); nothing changed"
                )
            yield
        finally:
            self._reconfiguring.release()

    def apply(self, new: Config) -> Applied:
        """Apply `new` as a diff, or raise with nothing changed: ConfigError (a plugin refused its new cameras or
        failed to start, named by its key as at start), CommandError `busy`."""
        with self._changing():
            try:
                return self._apply(new)
            except PluginStartError as exc:
                cause = exc.cause
                if isinstance(cause, PluginConfigError):
                    raise new.error(("plugins", exc.position, cause.key), str(cause)) from exc
                message = f"failed to start: {type(cause).__name__}: {cause}"
                raise new.error(("plugins", exc.position), message) from exc

    def _apply(self, new: Config) -> Applied:
        old = self.config
        old_cameras, new_cameras = old.cameras, new.cameras
        applied = Applied(
            added=sorted(set(new_cameras) - set(old_cameras)),
            removed=sorted(set(old_cameras) - set(new_cameras)),
            restarted=sorted(
                name
                for name in set(old_cameras) & set(new_cameras)
                if old_cameras[name] != new_cameras[name] or old.source(name) != new.source(name)
            ),
        )
        applied.unchanged = sorted(set(old_cameras) & set(new_cameras) - set(applied.restarted))
        applied.restart_required = [
            key for key in RESTART_REQUIRED if getattr(old.settings, key) != getattr(new.settings, key)
        ]
        if applied.restart_required:
            log.warning("reload: %s changed; they take effect at the next restart", ", ".join(applied.restart_required))

        chain = Chain(new.chain, self.device, new_cameras, self.threads.count, reuse=self.chain)
        chain.on_stage_time = self.chain.on_stage_time
        chain.start()  # models load here, while the old chain keeps running
        apply_threads(self.threads)
        leaving = [*applied.removed, *applied.restarted]
        left_behind = self.chain.left_behind(chain)

        def swap() -> None:
            # cameras are stopped only here, once the scheduler came round: a swap that times out touched none
            for name in leaving:
                self.captures[name].stop()
                self.exchange.retire(name)  # drops what waits; also wakes a capture waiting for its slot
            for name in applied.removed:
                self.scheduler.close_camera(name, "removed")
            for name in applied.restarted:
                self.scheduler.close_camera(name, "reconfigured")
            still_open = set(applied.unchanged) - self.paused
            now = time.time()
            for stage, plugin, served in left_behind:
                for name in sorted(served & still_open):
                    for event in self.chain.close_instance(stage, plugin, name, now):
                        self.publisher.publish(event)
            self.scheduler.take_over(chain, new.settings.scheduler, list(new_cameras))
            for name in applied.restarted:
                self.scheduler.reopen_camera(name)

        try:
            self.scheduler.call(swap, self.config.settings.control.timeout)
        except TimeoutError:
            chain.discard()
            raise CommandError("busy", "the scheduler did not come round (a plugin is stuck); nothing changed") from None
        for name in leaving:
            self.captures[name].join(CAPTURE_JOIN_TIMEOUT_S)
        for name in applied.removed:
            if not self.captures[name].is_alive():  # a capture still stuck in its source could still put frames
                self.exchange.forget(name)

        for stage, plugin, _ in left_behind:
            try:
                plugin.stop()
            except Exception:
                log.exception("plugin '%s' failed to stop cleanly", stage.spec.id)
        applied.plugins_stopped = sorted({stage.spec.id for stage, _, _ in left_behind})
        applied.plugins_started, applied.plugins_kept = chain.made_and_kept()
        self.chain = chain
        self.paused -= set(applied.removed) | set(applied.restarted)
        captures = {name: self.captures[name] for name in applied.unchanged}
        for name in [*applied.added, *applied.restarted]:
            self.exchange.admit(name)
            captures[name] = self._capture(new, name)
        self.captures = {name: captures[name] for name in new_cameras}  # one assignment: readers see old or new
        for name in [*applied.added, *applied.restarted]:
            captures[name].start()
        self.config = new
        if self._log_level_override is None:
            logging.getLogger().setLevel(new.settings.log_level)
        log.info("configuration applied: %s", applied.as_dict())
        return applied

    def pause(self, name: str) -> dict[str, str]:
        """Stop capturing `name` (its connection is closed, `camera.down` with reason `paused`) until `resume`."""
        with self._changing():
            if name not in self.captures:
                raise CommandError("unknown_camera", f"no camera named {name!r}")
            if name in self.paused:
                return {"camera": name, "state": "paused"}
            capture = self.captures[name]

            def close() -> None:  # on the scheduler thread: a pause answered busy has touched nothing
                capture.stop()
                self.exchange.retire(name)  # drops what waits: nothing of it reaches the chain after this
                self.scheduler.close_camera(name, "paused")

            self._on_scheduler(close)
            capture.join(CAPTURE_JOIN_TIMEOUT_S)
            self.paused.add(name)
            return {"camera": name, "state": "paused"}

    def resume(self, name: str) -> dict[str, str]:
        with self._changing():
            if name not in self.captures:
                raise CommandError("unknown_camera", f"no camera named {name!r}")
            if name not in self.paused:
                return {"camera": name, "state": self.captures[name].stats.state.value}
            self._on_scheduler(lambda: self.scheduler.reopen_camera(name))
            self.paused.discard(name)
            self.exchange.admit(name)
            capture = self._capture(self.config, name)
            self.captures = {**self.captures, name: capture}
            capture.start()
            return {"camera": name, "state": "resumed"}

    def _on_scheduler(self, function: Callable[[], None]) -> None:
        """Run `function` between two batches; CommandError `busy`, with `function` not run, when the scheduler
        does not come round within `control.timeout` (a plugin is stuck)."""
        try:
            self.scheduler.call(function, self.config.settings.control.timeout)
        except TimeoutError:
            raise CommandError("busy", "the scheduler did not come round (a plugin is stuck); nothing changed") from None

    def has_camera(self, name: str) -> bool:
        """`name` is configured (enabled or not)."""
        return name in self.config.settings.cameras

    def camera_list(self) -> dict[str, Any]:
        """Each camera's config (passwords masked) and state."""
        states = self.status()["cameras"]
        listed = {}
        for name, camera in self.config.settings.cameras.items():
            shown = camera.model_dump(mode="json", exclude_defaults=True)
            if "password" in shown:
                shown["password"] = "********"
            shown["source"] = redact(shown["source"])
            listed[name] = {"config": shown, "state": states.get(name, {}).get("state", "disabled")}
        return listed

    def snapshot(self, name: str, quality: int = 90) -> tuple[dict[str, Any], bytes]:
        """The last frame of `name` that came through the chain, as a JPEG."""
        import cv2

        if name not in self.config.settings.cameras:
            raise CommandError("unknown_camera", f"no camera named {name!r}")
        frame = self.scheduler.latest.get(name)
        if frame is None:
            raise CommandError("no_frame", f"camera {name!r} has no frame yet")
        ok, jpeg = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise CommandError("internal", "JPEG encoding failed")
        height, width = frame.image.shape[:2]
        meta = {"camera": name, "frame": frame.index, "ts": frame.ts_wall, "width": width, "height": height}
        return meta, jpeg.tobytes()
