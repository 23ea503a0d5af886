"""A configuration change (a reload, a camera added, replaced or removed) applied as a diff: compute, then commit.

1. `diff`: which cameras arrive, leave, restart or stay, and which settings wait for a restart. Pure.
2. `prepare`: what the change needs, made beside the running daemon: the new chain (it takes over the unchanged
   plugin instances and starts only its new ones: models load here while the old chain runs on) and the captures of
   the cameras that arrive (not started). Nothing running is touched: a plugin that refuses fails the change here.
3. `swap`, on the scheduler thread between two batches, is the commit point: the cameras that leave are stopped
   and closed, the instances the new chain does not take over close their cameras, and the scheduler takes over the
   new chain. When the scheduler does not come round (a plugin is stuck) the swap never runs: the only thing to
   undo is the prepared chain's own instances.
4. `settle`: waits for the captures that left, stops the instances left behind, and returns the `Change` for the
   daemon to commit, with the captures to start once it has.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from vigild.capture.camera import Capture
from vigild.config.loading import Config
from vigild.pipeline.chain import Chain, PluginStartError, Stage
from vigild.plugin import Plugin, PluginConfigError
from vigild.service.errors import CommandError
from vigild.service.outputs import OutputRefused
from vigild.service.running import CAPTURE_JOIN_TIMEOUT_S, Change, Pipeline, Running
from vigild.service.threads import apply_threads

log = logging.getLogger("vigild")

RESTART_REQUIRED = ("publisher", "journal", "cluster", "control", "curve", "metrics", "web", "device", "torch_threads",
                    "capture", "recording")
"""Settings a reload cannot change in a running process (sockets, the compute device): they wait for a restart."""


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
    outputs: dict[str, list[str]] = field(default_factory=dict)
    """The `outputs:` entries started, stopped and restarted (vigild.service.outputs)."""

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
            "outputs": self.outputs or {"started": [], "stopped": [], "restarted": []},
        }


@dataclass(frozen=True)
class Plan:
    """The diff between the running config and `new`, by camera name (each list sorted)."""

    new: Config
    added: list[str]
    removed: list[str]
    restarted: list[str]
    """In both, with a changed config or source: stopped, and started again with the new one."""
    unchanged: list[str]
    restart_required: list[str]

    @property
    def leaving(self) -> list[str]:
        """Cameras whose capture stops: removed or restarted."""
        return [*self.removed, *self.restarted]

    @property
    def arriving(self) -> list[str]:
        """Cameras that get a new capture: added or restarted."""
        return [*self.added, *self.restarted]


@dataclass(frozen=True)
class Prepared:
    """What `prepare` made; until the swap, nothing of it runs."""

    plan: Plan
    chain: Chain
    """Started: its new instances are running, those it takes over see their new cameras at the swap."""
    left_behind: list[tuple[Stage, Plugin, frozenset[str]]]
    """Instances of the running chain that `chain` does not take over, with the cameras they serve."""
    captures: dict[str, Capture]
    """Of the arriving cameras, not started."""


GEOMETRY: dict[str, Any] = {"zones": {}, "lines": {}, "motion": None}
"""A camera's settings that its plugins (and the motion gate) read at each frame: changing only these restarts
nothing."""


def diff(old: Config, new: Config) -> Plan:
    old_cameras, new_cameras = old.cameras, new.cameras
    both = set(old_cameras) & set(new_cameras)
    restarted = sorted(
        name
        for name in both
        if old_cameras[name].model_copy(update=GEOMETRY) != new_cameras[name].model_copy(update=GEOMETRY)
        or old.source(name) != new.source(name)
    )
    return Plan(
        new=new,
        added=sorted(set(new_cameras) - set(old_cameras)),
        removed=sorted(set(old_cameras) - set(new_cameras)),
        restarted=restarted,
        unchanged=sorted(both - set(restarted)),
        restart_required=[key for key in RESTART_REQUIRED if getattr(old.settings, key) != getattr(new.settings, key)],
    )


def prepare(plan: Plan, running: Running, pipeline: Pipeline) -> Prepared:
    """Make and start the new chain and make the arriving captures; ConfigError, with nothing changed, when a
    plugin refuses its new cameras or fails to start (named by its key, as at start)."""
    new = plan.new
    if pipeline.outputs is not None:  # an output that cannot start refuses the change before anything is made
        try:
            pipeline.outputs.check(new)
        except OutputRefused as exc:
            raise new.error(exc.key, str(exc)) from None
    try:
        chain = Chain(
            new.chain,
            pipeline.device,
            new.cameras,
            pipeline.threads.count,
            reuse=running.chain,
            publish=pipeline.bus.publish,
        )
        chain.start()  # models load here, while the old chain keeps running
    except PluginStartError as exc:
        cause = exc.cause
        if isinstance(cause, PluginConfigError):
            raise new.error(("plugins", exc.position, cause.key), str(cause)) from exc
        raise new.error(("plugins", exc.position), f"failed to start: {type(cause).__name__}: {cause}") from exc
    apply_threads(pipeline.threads)  # again: a model's import may have changed them
    captures = {name: pipeline.capture(new, name) for name in plan.arriving}
    return Prepared(plan, chain, running.chain.left_behind(chain), captures)


def swap(prepared: Prepared, running: Running, pipeline: Pipeline) -> None:
    """Scheduler thread: the commit point. Cameras are stopped only here, so a swap that never ran touched none."""
    plan, exchange, scheduler = prepared.plan, pipeline.exchange, pipeline.scheduler
    for name in plan.leaving:
        running.captures[name].stop()
        exchange.retire(name)  # drops what waits; also wakes a capture waiting for its slot
    for name in plan.removed:
        scheduler.close_camera(name, "removed")
    for name in plan.restarted:
        scheduler.close_camera(name, "reconfigured")
    still_open = set(plan.unchanged) - running.paused - running.unheld
    now = time.time()
    for stage, plugin, served in prepared.left_behind:
        for name in sorted(served & still_open):
            for event in running.chain.close_instance(stage, plugin, name, now):
                pipeline.bus.publish(event)
            scheduler.gate.camera_down(name)  # its tracks ended with the instance
    scheduler.take_over(prepared.chain, plan.new.settings.scheduler, list(plan.new.cameras),
                        plan.new.settings.motion_by_camera())  # fmt: skip
    for name in plan.restarted:
        scheduler.reopen_camera(name)


def settle(prepared: Prepared, running: Running, pipeline: Pipeline) -> Change[Applied]:
    """After the swap: let the cameras that left go, stop the instances left behind; the new state to commit."""
    plan = prepared.plan
    for name in plan.leaving:
        running.captures[name].join(CAPTURE_JOIN_TIMEOUT_S)
    for name in plan.removed:
        if not running.captures[name].is_alive():  # a capture still stuck in its source could still put frames
            pipeline.exchange.forget(name)
    for stage, plugin, _ in prepared.left_behind:  # a branch finishes first; a plugin failing to stop is logged
        running.chain.stop_instance(stage, plugin)
    for name in plan.arriving:
        pipeline.exchange.admit(name)
    captures = {
        name: prepared.captures[name] if name in prepared.captures else running.captures[name]
        for name in plan.new.cameras
    }
    started, kept = prepared.chain.made_and_kept()
    applied = Applied(
        added=plan.added,
        removed=plan.removed,
        restarted=plan.restarted,
        unchanged=plan.unchanged,
        plugins_kept=kept,
        plugins_started=started,
        plugins_stopped=sorted({stage.spec.id for stage, _, _ in prepared.left_behind}),
        restart_required=plan.restart_required,
        outputs=pipeline.outputs.apply(plan.new.settings.outputs) if pipeline.outputs is not None else {},
    )
    paused = running.paused - set(plan.leaving)
    # in a cluster, a camera restarted stays held or not as it was, and one added waits for the placement to claim it
    unheld = (running.unheld - set(plan.removed)) | (set(plan.added) if running.clustered else set())
    new_running = Running(plan.new, prepared.chain, captures, paused, frozenset(unheld), running.clustered)
    starting = tuple(prepared.captures[name] for name in plan.arriving if name not in unheld)
    return Change(new_running, applied, starting)


def reconfigure(running: Running, new: Config, pipeline: Pipeline, timeout: float) -> Change[Applied]:
    """The change from `running` to `new`, up to the commit that is the caller's; raises with nothing changed:
    ConfigError (a plugin refused or failed to start), CommandError `busy` (the scheduler did not come round within
    `timeout`)."""
    plan = diff(running.config, new)
    if plan.restart_required:
        log.warning("reload: %s changed; they take effect at the next restart", ", ".join(plan.restart_required))
    prepared = prepare(plan, running, pipeline)
    try:
        pipeline.on_scheduler(partial(swap, prepared, running, pipeline), timeout)
    except CommandError:
        prepared.chain.discard()  # the swap never ran: only what was prepared is undone
        raise
    return settle(prepared, running, pipeline)
