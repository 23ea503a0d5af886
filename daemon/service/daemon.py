"""The daemon: wires capture → exchange → scheduler/chain → event bus → outputs, and stops them in that order.

Around that flow it holds what a service needs: the systemd notifications and watchdog, the heartbeat, the control
socket and the Prometheus endpoint. What it does on their behalf lives beside it: the status snapshot (status.py),
configuration changes applied as a diff (reconfigure.py), and the commands on one camera (cameras.py). Those
compute a `Change`; only the daemon commits it, one at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from vigild.capture.camera import Capture
from vigild.capture.exchange import FrameExchange
from vigild.cluster.placement import Placement
from vigild.config.edits import camera_edit, edits_path, edits_text, file_camera, read_edit_entries, write_edits_text
from vigild.config.loading import Config, ConfigError, load_config, with_camera
from vigild.config.yamlsource import KeyPath
from vigild.cpus import prefer_passive_waits
from vigild.events import SYSTEM_CAMERA, Event
from vigild.natslink import NatsLinks
from vigild.outputs.bus import EventBus
from vigild.outputs.publisher import Publisher, PublisherError
from vigild.outputs.replay import ReplayError
from vigild.pipeline.chain import Chain
from vigild.pipeline.durations import Timings
from vigild.pipeline.gate import MotionGate
from vigild.pipeline.scheduler import Scheduler
from vigild.service import cameras, status
from vigild.service.control import CommandError, ControlServer
from vigild.service.journaling import JournalBusy, Journaling
from vigild.service.notify import ServiceNotifier
from vigild.service.outputs import OutputRefused, Outputs, nats_login
from vigild.service.reconfigure import RESTART_REQUIRED, Applied, reconfigure
from vigild.service.running import CAPTURE_JOIN_TIMEOUT_S, Change, Pipeline, Running
from vigild.service.status import Heartbeat, Rates, status_line
from vigild.service.threads import apply_threads, choose_threads
from vigild.service.workers import capture_workers

log = logging.getLogger("vigild")

SCHEDULER_JOIN_TIMEOUT_S = 6.0
HOLD_ATTEMPTS = 3
"""Tries to start or stop a camera for the placement while another change holds the configuration lock."""
"""With the captures' 2 s and the publisher's linger, a stop ends well within systemd's 10 s expectation."""

__all__ = ["RESTART_REQUIRED", "Applied", "BindError", "Daemon", "status_line"]

C = TypeVar("C", bound=Change[Any])


class BindError(Exception):
    """A socket or port the config names could not be bound (taken, no permission); `key` is where it is set."""

    def __init__(self, key: KeyPath, message: str):
        self.key = key
        super().__init__(message)


class Daemon:
    def __init__(self, config: Config, log_level_override: str | None = None):
        """`log_level_override`: the level given on the command line, which configs applied later never change."""
        self._log_level_override = log_level_override
        settings = config.settings
        prefer_passive_waits()  # before torch loads
        from vigild.vision.device import resolve_device  # imports torch: only once a daemon is made

        device = resolve_device(settings.device)
        # torch_threads, else the CPUs this process may use; never OMP_NUM_THREADS left by whoever started us
        threads = choose_threads(settings.torch_threads)
        apply_threads(threads)
        self._stop_requested = threading.Event()
        exchange = FrameExchange()
        # every event, whoever makes it, enters the bus: the one place that stamps it and hands it to the outputs
        self.bus = bus = EventBus()
        publisher = Publisher(settings.publisher, curve=settings.curve)
        chain = Chain(config.chain, device, config.cameras, threads.count, publish=bus.publish)
        # every camera ended (files read to their end): the scheduler sets our stop request
        scheduler = Scheduler(settings.scheduler, exchange, chain, bus.publish, list(config.cameras),
                              self._stop_requested, device, MotionGate(settings.motion_by_camera()))  # fmt: skip
        cameras = len(config.cameras)
        self.workers = capture_workers(settings.capture, exchange, threads.usable_cpus, cameras, config.file)
        self.journaling = journaling = Journaling(settings.journal, config.file, bus, settings.curve)
        cluster = settings.cluster
        self.nats_links = NatsLinks(cluster.name if cluster is not None else "vigild")
        """The daemon's NATS connections: the nats output and the cluster share one per server and login."""
        self.outputs = Outputs(bus, lambda: journaling.writer,
                               lambda: [publisher, *([journaling.writer] if journaling.writer is not None else [])],
                               config.file, self, self.nats_links, cluster)  # fmt: skip
        self.recording: Any = None
        recording_root = None
        if any(settings.camera_recording(name) is not None for name in config.cameras):
            from vigild.config.recording import recordings_root
            from vigild.recording.manager import Recording  # GStreamer: only when recording

            recording_root = recordings_root(settings.recording, journaling.path)
            self.recording = Recording(recording_root, journaling.path, settings.recording,
                                       lambda camera: self.config.settings.camera_recording(camera)
                                       if camera in self.config.cameras else None,
                                       lambda: self._running.captures, bus.publish, bus.run)  # fmt: skip
            exchange.clip_listener = self.recording.report
        self.placement: Placement | None = None
        if cluster is not None:  # leases of the cameras, shared with the other members (docs/cluster.md)
            link = self.nats_links.link(nats_login(cluster.nats, cluster))
            self.placement = Placement(cluster, link, self, bus.run)
            bus.fence = self.placement.fence.allows
        self.pipeline = Pipeline(exchange, scheduler, publisher, device, threads, self.workers, self.journaling,
                                 bus, self.outputs, recording_root, self.recording, self.placement)  # fmt: skip
        self.exchange, self.scheduler, self.publisher = exchange, scheduler, publisher
        self.device, self.threads = device, threads
        unheld = frozenset(config.cameras) if cluster is not None else frozenset()  # until the placement claims them
        self._running = Running(config, chain, {name: self.pipeline.capture(config, name) for name in config.cameras},
                                unheld=unheld, clustered=cluster is not None)  # fmt: skip
        """Replaced whole by a change, never altered: readers on other threads see the old state or the new."""
        self._rates = Rates()
        self.heartbeat = Heartbeat(settings.publisher.heartbeat_interval, self._heartbeat, bus.publish)
        self.notifier = ServiceNotifier(self.healthy, self.status_line)
        control = settings.control  # its default socket is per config file (vigild.paths.control_endpoint)
        self.control = ControlServer(control, settings.curve, self, config.file) if control.enabled else None
        self.metrics: Any = None
        if settings.metrics.enabled:
            from vigild.service.metrics import MetricsServer

            self.metrics = MetricsServer(settings.metrics, self)
        self.web: Any = None
        if settings.web is not None:
            from vigild.web.server import WebConsole  # imports aiohttp: only with a console

            self.web = WebConsole(settings.web, self)
            scheduler.tap = self.web.live.offer
        self._reconfiguring = threading.Lock()
        self._started = threading.Event()
        """Set once `start` has started the captures: a change before that would race it (a camera started twice)."""
        self._started_at = time.monotonic()

    @property
    def config(self) -> Config:
        return self._running.config

    @property
    def chain(self) -> Chain:
        return self._running.chain

    @property
    def captures(self) -> Mapping[str, Capture]:
        return self._running.captures

    @property
    def paused(self) -> frozenset[str]:
        return self._running.paused

    def start(self) -> None:
        """Start everything, or raise with nothing left running: PluginStartError for a plugin, BindError for a
        socket or port."""
        import zmq

        # bind first: subscribers waiting to connect get in while the models load, and miss no early event
        try:
            self.publisher.start()
        except PublisherError as exc:
            raise BindError(("publisher", "endpoint"), str(exc)) from exc
        self.bus.attach(self.publisher)
        started: list[Any] = [self.publisher]
        try:
            try:  # before any event is published: seq goes on from the journal's last
                self.journaling.start()
            except JournalBusy as exc:
                raise BindError(("journal", "path"), str(exc)) from exc
            except ReplayError as exc:
                raise BindError(("journal", "replay_endpoint"), str(exc)) from exc
            started.append(self.journaling)
            try:
                self.outputs.check(self.config)
            except OutputRefused as exc:
                raise BindError(exc.key, str(exc)) from exc
            self.outputs.start(self.config)
            started.append(self.outputs)
            if self.recording is not None:
                self.recording.start()
                self.bus.attach(self.recording)
                started.append(self.recording)
            self.heartbeat.start()
            started.append(self.heartbeat)
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
            if self.web is not None:
                try:
                    self.web.start()
                except Exception as exc:
                    raise BindError(("web", "listen"), str(exc.__cause__ or exc)) from exc
                started.append(self.web)
            if self.workers is not None:  # they start while the models load
                self.workers.start()
                started.append(self.workers)
            self.chain.start()
            apply_threads(self.threads)  # again: importing ultralytics, for one, sets cv2.setNumThreads(0)
        except Exception:
            for part in reversed(started):
                part.stop()
            raise
        self.publisher.await_subscribers(self._stop_requested)
        self.scheduler.start()
        with self._reconfiguring:  # a change that got the lock before this point has answered `busy`
            for name, capture in self._running.captures.items():
                if name not in self._running.unheld:
                    capture.start()
            self._started.set()
        if self.placement is not None:
            self.placement.start()
        log.info(
            "running %d camera(s) on %s (%d threads, %s), publishing on %s%s",
            len(self._running.captures),
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
        """True once a stop was requested (or every camera has ended)."""
        return self._stop_requested.wait(timeout)

    def stop(self) -> None:
        """Stop capture, finish the batch in flight, publish the closing events, close the sockets."""
        self._stop_requested.set()  # changes still waiting for the lock give up
        self.notifier.stopping()
        if self.control is not None:
            self.control.stop()
        if self.web is not None:
            self.web.stop()
        with self._reconfiguring:
            captures = self._running.captures
            for capture in captures.values():
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
            if self.placement is not None:  # the closing events are out: hand the cameras over at once
                self.placement.released_all()
                self.placement.stop()
            if self.recording is not None:  # the clips being written are saved, and announced, before outputs stop
                deadline = time.monotonic() + CAPTURE_JOIN_TIMEOUT_S
                for capture in captures.values():
                    capture.join(max(0.0, deadline - time.monotonic()))
                self.bus.detach(self.recording)
                self.recording.stop()
            self.heartbeat.stop()
            self.outputs.stop()  # first: one catching up may still read what the journal's writer stores
            self.publisher.stop()
            self.journaling.stop()  # last: every event the bus took is on its writer
            if self.metrics is not None:
                self.metrics.stop()
            deadline = time.monotonic() + CAPTURE_JOIN_TIMEOUT_S
            for capture in captures.values():
                capture.join(max(0.0, deadline - time.monotonic()))
                if capture.is_alive():
                    log.warning(
                        "camera %s did not stop within %.0f s (blocked in its source)",
                        capture.name,
                        CAPTURE_JOIN_TIMEOUT_S,
                    )
            if self.workers is not None:
                self.workers.stop()
        log.info("stopped")

    # ----- health and status

    def healthy(self, max_age_s: float) -> bool:
        """The scheduler and the publisher both went round their loops within `max_age_s` (the watchdog asks)."""
        now = time.monotonic()
        publisher_age = max(max_age_s, 2 * self.config.settings.publisher.heartbeat_interval)
        return now - self.scheduler.alive_at < max_age_s and now - self.publisher.alive_at < publisher_age

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started_at

    def status(self) -> dict[str, Any]:
        """The daemon's state as the heartbeat, `vigild ctl status`, STATUS= and the metrics report it."""
        snapshot = status.snapshot(self._running, self.pipeline, self._rates, self.uptime_s)
        if self.web is not None:
            snapshot["web"] = self.web.status()
        return snapshot

    def status_line(self) -> str:
        """systemd's STATUS=, from the same snapshot as the heartbeat, `vigild ctl status` and the metrics."""
        return status_line(self.status())

    def timings(self) -> Timings:
        """The metrics' histograms: latency per frame, each plugin's time per batch."""
        return status.timings(self._running, self.pipeline)

    def _heartbeat(self) -> Event:
        """On the heartbeat thread, once per `heartbeat_interval`; rates are over the last interval."""
        running = self._running
        self._rates.update(self.scheduler.processed, running.captures, running.chain)
        data = status.snapshot(running, self.pipeline, self._rates, self.uptime_s)
        return Event("heartbeat", SYSTEM_CAMERA, time.time(), data=data)

    def has_camera(self, name: str) -> bool:
        """`name` is configured (enabled or not)."""
        return name in self.config.settings.cameras

    def camera_list(self) -> dict[str, Any]:
        """Each camera's config (passwords masked) and state."""
        return status.camera_list(self.config, self.status()["cameras"])

    def snapshot(self, name: str, quality: int = 90) -> tuple[dict[str, Any], bytes]:
        """The last frame of `name` that came through the chain, as a JPEG."""
        return cameras.snapshot(self._running, self.pipeline, name, quality)

    # ----- changes (control thread or main thread; one at a time, each committed here)

    def reload(self) -> Applied:
        """Read the config file again and apply it as a diff; an invalid file raises and changes nothing."""
        log.info("reloading %s", self.config.file)
        self.notifier.reloading()
        try:
            try:
                new = load_config(self.config.file)
                new.backends()  # this machine's, as `vigild run` checked them: loading checks values only
                applied = self.apply(new)
            except (ConfigError, CommandError) as exc:
                log.error("reload refused, still running the previous config: %s", exc)
                raise
            control_curve = self.control.curve if self.control is not None else None
            for part in (self.publisher.curve, self.journaling.curve, control_curve):
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

    def apply(self, new: Config) -> Applied:
        """Apply `new` as a diff, or raise with nothing changed: ConfigError (a plugin refused its new cameras or
        failed to start, named by its key as at start), CommandError `busy`."""
        with self._changing():
            applied = self._commit(reconfigure(self._running, new, self.pipeline, self._timeout)).result
            if self._log_level_override is None:
                logging.getLogger().setLevel(new.settings.log_level)
            log.info("configuration applied: %s", applied.as_dict())
            return applied

    def edit_geometry(self, camera: str, zones: dict[str, Any], lines: dict[str, Any]) -> dict[str, Any]:
        """The web console's editor: make `zones` and `lines` the camera's, saved in the edits file of the state
        directory (vigild.config.edits) and applied without restarting the camera. Validated whole as a reload is
        first: ConfigError (each problem's key), with nothing changed. The running config becomes the file's with
        the edits (as a reload would: a control client's camera changes since the last reload are dropped)."""
        if camera not in self.config.settings.cameras:
            raise CommandError("unknown_camera", f"no camera named {camera!r}")
        file = self.config.file
        path = edits_path(file)
        entries = read_edit_entries(path)
        entries[camera] = camera_edit(file_camera(file, camera), zones, lines)
        text = edits_text(entries)
        new = load_config(file, edits_text=text)
        new.backends()
        before = path.read_text() if path.exists() else None
        write_edits_text(path, text)
        try:
            applied = self.apply(new)
        except BaseException:
            if before is None:
                path.unlink(missing_ok=True)
            else:
                write_edits_text(path, before)
            raise
        log.info("camera %s: zones %s and lines %s saved to %s", camera, sorted(zones), sorted(lines), path)
        return applied.as_dict()

    def pause(self, name: str) -> dict[str, str]:
        """Stop capturing `name` (its connection is closed, `camera.down` with reason `paused`) until `resume`."""
        with self._changing():
            return self._commit(cameras.pause(self._running, name, self.pipeline, self._timeout)).result

    def resume(self, name: str) -> dict[str, str]:
        with self._changing():
            return self._commit(cameras.resume(self._running, name, self.pipeline, self._timeout)).result

    # ----- the cluster's placement (vigild.cluster.placement.CameraHolder)

    def hold(self, name: str) -> None:
        """This daemon now holds `name`'s lease: capture it (a change made like a resume)."""
        for attempt in range(HOLD_ATTEMPTS):
            try:
                with self._changing():
                    self._commit(cameras.hold(self._running, name, self.pipeline, self._timeout))
                return
            except CommandError as exc:
                if exc.code != "busy" or self._stop_requested.is_set() or attempt == HOLD_ATTEMPTS - 1:
                    raise

    def release(self, name: str, reason: str) -> None:
        """This daemon gives up (or lost) `name`'s lease: stop capturing it. During a stop, the stop does it."""
        for attempt in range(HOLD_ATTEMPTS):
            if self._stop_requested.is_set() or name not in self._running.config.cameras:  # stopping, or removed
                return
            try:
                with self._changing():
                    self._commit(cameras.release(self._running, name, self.pipeline, self._timeout, reason))
                return
            except CommandError as exc:  # the fence already keeps its events in: this only frees the capture
                if exc.code != "busy" or attempt == HOLD_ATTEMPTS - 1:
                    raise

    def cluster_cameras(self) -> list[str]:
        return list(self._running.config.cameras)

    @property
    def _timeout(self) -> float:
        """How long a change waits for the scheduler to come round (`control.timeout`)."""
        return self.config.settings.control.timeout

    def _commit(self, change: C) -> C:
        self._running = change.running  # one assignment: readers see the old state or the new
        for capture in change.starting:
            capture.start()
        return change

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """One configuration change at a time; CommandError `busy` when another one (a reload loading a model)
        holds on past `control.timeout`, so that nobody waits without end."""
        if not self._reconfiguring.acquire(timeout=self._timeout):
            raise CommandError("busy", "another reload or camera change is under way; nothing changed, try again")
        try:
            if self._stop_requested.is_set():  # a change that waited for the lock while the daemon stopped
                raise CommandError("busy", "the daemon is stopping; nothing changed")
            if not self._started.is_set():  # the control socket answers while models load and subscribers join
                raise CommandError(
                    "busy", "the daemon is still starting (loading models or awaiting subscribers); nothing changed"
                )
            yield
        finally:
            self._reconfiguring.release()
