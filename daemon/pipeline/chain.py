"""The plugin chain: each configured plugin, in order, over each batch of frames.

Cameras whose effective config of a plugin is the same share one instance (one model serving them all, one
batch); a camera with overrides gets an instance of its own.

When a plugin raises on a batch, every failure is counted and logged (rate-limited per plugin and camera):
- `FrameErrors` names the bad frames; only those fail and leave the chain.
- Any other exception from a `repeatable` plugin (stateless per frame, such as a detector) is counted as a failed
  batch, and the batch is run again frame by frame so that only the frames that fail again are lost.
- Any other exception from a plugin that is not repeatable (one with state, such as a tracker) fails the whole
  batch: running it again on frames it has already seen would feed its state twice.

On a reload the new chain takes over every instance whose plugin id, class and effective config did not change
(its state, its loaded model, its tracks) and makes only the others, so unchanged plugins run on without a gap.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any

from vigild.config.plugin_spec import PluginSpec
from vigild.config.settings import CameraConfig
from vigild.events import Event, add_track_events
from vigild.frame import Frame
from vigild.pipeline.branch import Branch, branch_share
from vigild.pipeline.branch_process import ProcessPlugin
from vigild.pipeline.durations import PLUGIN_BUCKETS, Durations
from vigild.pipeline.placement import Beside, InChain, Runner, in_own_process, whole_beside
from vigild.plugin import BranchWork, FrameErrors, Plugin, PluginConfig, PluginContext

log = logging.getLogger("vigild.chain")

FAILURE_LOG_INTERVAL_S = 10.0
BRANCH_STOP_S = 5.0
"""How long the plugins that run as branches get, all together, to finish what they hold when they stop."""


@dataclass
class Stage:
    spec: PluginSpec
    instances: list[tuple[Plugin, frozenset[str]]]
    cameras: frozenset[str] = frozenset()
    """Every camera one of its instances serves."""
    seconds: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)
    """Frames this plugin failed on, by camera."""
    batch_failures: int = 0
    """Whole batches this plugin raised on (a repeatable plugin's frames may still have come through on a rerun)."""
    removed_failures: int = 0
    """Failures of cameras since removed: kept in the plugin's total, so that its counter never goes down."""
    durations: Durations = field(default_factory=lambda: Durations(PLUGIN_BUCKETS))
    """The plugin's time per batch (the metrics read it)."""
    frames: int = 0
    """Frames the plugin ran on (a branch: those it took, not those it skipped)."""
    runner: Runner | None = None
    """How the chain runs it, by its placement (vigild.pipeline.placement); set once the chain is made."""

    @property
    def total_failures(self) -> int:
        return sum(dict(self.failures).values()) + self.removed_failures  # a copy: the scheduler may add a camera


class PluginStartError(Exception):
    def __init__(self, plugin_id: str, position: int, cause: BaseException):
        self.plugin_id = plugin_id
        self.position = position
        self.cause = cause
        super().__init__(f"plugin '{plugin_id}' (plugins.{position}) failed to start: {type(cause).__name__}: {cause}")


InstanceKey = tuple[str, type, str]
"""(plugin id, class, effective config as JSON): an instance with the same key can serve on after a reload."""


class Chain:
    def __init__(
        self,
        specs: tuple[PluginSpec, ...],
        device: str,
        cameras: Mapping[str, CameraConfig],
        torch_threads: int | None = None,
        reuse: Chain | None = None,
        publish: Callable[[Event], None] | None = None,
    ):
        """`reuse`: the running chain, whose unchanged instances this one takes over (they are not started again;
        they see their new cameras only at `activate()`, on the scheduler thread). `publish`: where the events of
        plugins that run as branches go (vigild.pipeline.branch); the chain's own events are the caller's."""
        self.stages: list[Stage] = []
        self._publish = publish if publish is not None else _unpublished
        self._torch_threads = torch_threads
        self._device = device
        self.branches: dict[int, Branch] = {}
        """Of the instances that run beside the chain, by `id(plugin)`."""
        self._branch_handover: list[tuple[Stage, Plugin, Branch]] = []
        self._predecessors: list[tuple[Stage, Stage]] = []
        """(stage, the running chain's stage of the same id): its counters go on from the other's at the swap."""
        self._keys: dict[InstanceKey, Plugin] = {}
        self._fresh: list[tuple[Stage, Plugin]] = []
        self._handover: list[tuple[Plugin, Mapping[str, CameraConfig]]] = []
        previous = reuse._keys if reuse is not None else {}
        previous_stages = {stage.spec.id: stage for stage in reuse.stages} if reuse is not None else {}
        for position, spec in enumerate(specs):
            groups: dict[str, tuple[PluginConfig, set[str]]] = {}
            for camera, config in spec.per_camera.items():
                key = config.model_dump_json()
                groups.setdefault(key, (config, set()))[1].add(camera)
            stage = Stage(spec, [])
            if spec.id in previous_stages:  # counters carry on across a reload (taken over at `activate`)
                self._predecessors.append((stage, previous_stages[spec.id]))
            for json_config, (config, served) in groups.items():
                served_cameras = MappingProxyType({name: cameras[name] for name in sorted(served)})  # read-only
                instance_key = (spec.id, spec.cls, json_config)
                try:
                    plugin = previous.get(instance_key)
                    if plugin is not None:
                        plugin.check_cameras(served_cameras)
                        self._handover.append((plugin, served_cameras))
                        if reuse is not None and id(plugin) in reuse.branches:
                            branch = reuse.branches[id(plugin)]
                            self.branches[id(plugin)] = branch
                            self._branch_handover.append((stage, plugin, branch))
                    else:
                        context = PluginContext(device, served_cameras, torch_threads, spec.placement, self._publish)
                        if in_own_process(spec):  # its stand-in here; the plugin is built in its process at start
                            plugin = ProcessPlugin(spec.cls, spec.id, config, context)
                        else:
                            plugin = spec.cls(config, context)
                        self._fresh.append((stage, plugin))
                        if whole_beside(spec):
                            self.branches[id(plugin)] = self._branch(stage, plugin)
                except Exception as exc:
                    raise PluginStartError(spec.id, position, exc) from exc
                self._keys[instance_key] = plugin
                stage.instances.append((plugin, frozenset(served)))
                stage.cameras |= served
            stage.runner = Beside(stage, self.branches) if whole_beside(spec) else InChain(stage, self._run, self._observe)
            self.stages.append(stage)
        self._last_failure_log: dict[tuple[str, str], float] = {}
        self._cameras = frozenset(cameras)

    def _branch(self, stage: Stage, plugin: Plugin) -> Branch:
        return Branch(
            stage.spec.id,
            partial(self._run, stage, plugin),
            plugin.on_source_end,
            self._publish,
            partial(self._observe, stage),
            self._torch_threads,
            branch_share(stage.spec.config.branch_share, self._device),
            pid=partial(getattr, plugin, "pid") if isinstance(plugin, ProcessPlugin) else None,
        )

    @staticmethod
    def _observe(stage: Stage, elapsed: float, frames: int) -> None:
        stage.seconds += elapsed
        stage.frames += frames
        stage.durations.observe(elapsed)

    def start(self) -> None:
        """Start the instances this chain made (not those taken over), and their branches; on failure stop them and
        raise."""
        started: list[tuple[Stage, Plugin]] = []
        for stage, plugin in self._fresh:
            try:
                plugin.start()
            except Exception as exc:
                self._stop_plugins(started)
                raise PluginStartError(stage.spec.id, self.stages.index(stage), exc) from exc
            started.append((stage, plugin))
        for _, plugin in self._fresh:
            branch = self.branches.get(id(plugin))
            if branch is not None:
                branch.start()

    def stop(self) -> None:
        """Branches finish what they hold (closing events included) first, then every plugin stops."""
        self._stop_plugins([(stage, plugin) for stage in self.stages for plugin, _ in stage.instances])

    def discard(self) -> None:
        """A chain that was made and started but will not run (a reload refused): stop only what it started."""
        self._stop_plugins(self._fresh)

    def stop_instance(self, stage: Stage, plugin: Plugin) -> None:
        """One instance a change leaves behind: its branch finishes, then it stops."""
        self._stop_plugins([(stage, plugin)])

    def activate(self) -> None:
        """Scheduler thread, at the swap: instances taken over now serve their new cameras (a new context: the one
        they had is frozen, and its cameras read-only); branches taken over count into this chain's stages."""
        for stage, old in self._predecessors:  # as they are now, on the scheduler thread: no count is lost
            stage.seconds, stage.failures, stage.batch_failures = old.seconds, old.failures, old.batch_failures
            stage.removed_failures, stage.durations, stage.frames = old.removed_failures, old.durations, old.frames
        for plugin, cameras in self._handover:
            plugin.context = dataclasses.replace(plugin.context, cameras=cameras)
        for stage, plugin, branch in self._branch_handover:
            branch.rebind(partial(self._run, stage, plugin), partial(self._observe, stage))
        for stage in self.stages:  # counters carried over keep nothing of cameras gone (added again: from zero)
            for camera in [name for name in stage.failures if name not in self._cameras]:
                stage.removed_failures += stage.failures.pop(camera)

    def made_and_kept(self) -> tuple[list[str], list[str]]:
        """Plugin ids with an instance this chain made, and those whose instances were all taken over."""
        made = {stage.spec.id for stage, _ in self._fresh}
        return sorted(made), sorted({stage.spec.id for stage in self.stages} - made)

    def left_behind(self, successor: Chain) -> list[tuple[Stage, Plugin, frozenset[str]]]:
        """Instances of this chain that `successor` does not take over, with the cameras they serve."""
        kept = {id(plugin) for plugin in successor._keys.values()}
        return [
            (stage, plugin, cameras)
            for stage in self.stages
            for plugin, cameras in stage.instances
            if id(plugin) not in kept
        ]

    def branch_work(self, stage: Stage) -> list[BranchWork]:
        """What of `stage` runs beside the chain: the branches of its instances, or their own workers (a plugin
        that `keeps_order`); none for a plugin in the chain."""
        works = [self.branches.get(id(plugin)) or plugin.branch_work() for plugin, _ in stage.instances]
        return [work for work in works if work is not None]

    def close_instance(self, stage: Stage, plugin: Plugin, camera: str, ts_wall: float) -> list[Event]:
        return _runner(stage).close(plugin, camera, ts_wall, -1)

    def _stop_plugins(self, plugins: list[tuple[Stage, Plugin]]) -> None:
        """Branches first, all together against one deadline; a plugin whose branch is still inside it (stuck) is
        not stopped under it."""
        branches = [self.branches[id(plugin)] for _, plugin in plugins if id(plugin) in self.branches]
        for branch in branches:
            branch.request_stop()
        deadline = time.monotonic() + BRANCH_STOP_S
        stuck = {id(branch) for branch in branches if not branch.join(deadline)}
        for stage, plugin in plugins:
            if id(self.branches.get(id(plugin))) in stuck:
                if isinstance(plugin, ProcessPlugin):  # unlike a thread, a process can be ended
                    plugin.kill()
                continue
            try:
                plugin.stop()
            except Exception:
                log.exception("plugin '%s' failed to stop cleanly", stage.spec.id)

    def process(self, frames: list[Frame]) -> list[Frame]:
        """Run every stage; returns the frames that came through without a plugin failure."""
        live = frames
        for stage in self.stages:
            failed = _runner(stage).process(live)
            if failed:
                live = [frame for frame in live if id(frame) not in failed]
        for frame in frames:  # the tracker's verdicts become events once every plugin has added its data; also on a
            add_track_events(frame)  # frame a later plugin failed on: the tracker's state has moved on with it
        return live

    def prefetch(self, frames: list[Frame]) -> list[Future[Any]]:
        """Let the first plugin start the device work of the next batch (`Plugin.prefetch`); `process` with the
        same frames picks it up. Returns what was started (done once the results are ready). A plugin beside the
        chain, or one that cannot, does nothing ahead."""
        return _runner(self.stages[0]).prefetch(frames) if self.stages else []

    def source_ended(self, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        """Every instance serving `camera` closes it; the closing events of those in the chain, in chain order."""
        return [
            event
            for stage in self.stages
            for plugin, cameras in stage.instances
            if camera in cameras
            for event in _runner(stage).close(plugin, camera, ts_wall, frame_index)
        ]

    def _run(self, stage: Stage, plugin: Plugin, batch: list[Frame]) -> set[int]:
        if not plugin.batched or len(batch) == 1:
            return {failed for frame in batch for failed in self._run_one(stage, plugin, frame)}
        try:
            plugin.process(batch)
            return set()
        except FrameErrors as errors:  # the plugin did the rest of the batch and names the bad frames
            named = {position: exc for position, exc in errors.errors.items() if 0 <= position < len(batch)}
            for position, exc in named.items():
                self._report(stage, batch[position], exc)
            return {id(batch[position]) for position in named}
        except Exception as exc:
            stage.batch_failures += 1
            if not plugin.repeatable:  # never feed a stateful plugin the same frames twice: the batch fails
                for frame in batch:
                    self._report(stage, frame, exc, batch_size=len(batch))
                return {id(frame) for frame in batch}
            self._report_batch(stage, batch, exc)
        # a repeatable plugin: frame by frame, so that only the frames that fail again are lost
        return {failed for frame in batch for failed in self._run_one(stage, plugin, frame)}

    def _run_one(self, stage: Stage, plugin: Plugin, frame: Frame) -> set[int]:
        try:
            plugin.process([frame])
            return set()
        except FrameErrors as errors:
            self._report(stage, frame, next(iter(errors.errors.values()), errors))
            return {id(frame)}
        except Exception as exc:
            self._report(stage, frame, exc)
            return {id(frame)}

    def _report_batch(self, stage: Stage, batch: list[Frame], exc: Exception) -> None:
        if self._due((stage.spec.id, "<batch>")):
            log.error(
                "plugin '%s' failed on a batch of %d frames (%d failed batches so far); running it again frame by "
                "frame: %s: %s",
                stage.spec.id,
                len(batch),
                stage.batch_failures,
                type(exc).__name__,
                exc,
                exc_info=stage.batch_failures == 1,
            )

    def _due(self, key: tuple[str, str]) -> bool:
        """Rate limit for failure logs: at most one per `FAILURE_LOG_INTERVAL_S` and key."""
        now = time.monotonic()
        if now - self._last_failure_log.get(key, -FAILURE_LOG_INTERVAL_S) < FAILURE_LOG_INTERVAL_S:
            return False
        self._last_failure_log[key] = now
        return True

    def _report(self, stage: Stage, frame: Frame, exc: BaseException, batch_size: int = 1) -> None:
        stage.failures[frame.camera] += 1
        if self._due((stage.spec.id, frame.camera)):
            whole = f" (the whole batch of {batch_size} failed)" if batch_size > 1 else ""
            log.error(
                "plugin '%s' failed on camera %s frame %d%s (%d failures on this camera so far): %s: %s",
                stage.spec.id,
                frame.camera,
                frame.index,
                whole,
                stage.failures[frame.camera],
                type(exc).__name__,
                exc,
                exc_info=stage.failures[frame.camera] == 1,
            )


def _runner(stage: Stage) -> Runner:
    assert stage.runner is not None, "a stage gets its runner when the chain is made"
    return stage.runner


def _unpublished(event: Event) -> None:
    """A chain made without a publisher (tools, tests) has nowhere to send its branches' events."""
    log.debug("no publisher: dropping %s from a branch", event.type)


def failures_by_camera(chain: Chain) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for stage in chain.stages:
        for camera, count in dict(stage.failures).items():  # a copy: the scheduler thread may add a camera
            total[camera] += count
    return dict(total)
