"""Where each stage of the chain runs (`placement:`), decided once when the chain is made: every stage gets a
runner with the same three methods, so the chain runs, starts ahead and closes every stage the same way.

- `InChain`: the stage's instances run on the scheduler thread, in order, on every frame; the stage's time is
  counted per batch, and a failure takes the frame out of the rest of the chain. Also a plugin that `keeps_order`:
  it runs in the chain and places its slow part itself (`PluginContext.placement`).
- `Beside`: each instance has a `Branch` (vigild.pipeline.branch) on a thread of its own, and for `process` its
  plugin is a stand-in (vigild.pipeline.branch_process) whose calls go to a process of its own. The chain offers
  the frames and never waits; the branch counts its own time and publishes its own events, closing events
  included, in turn with its frames.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

from vigild.config.plugin_spec import PluginSpec
from vigild.events import Event
from vigild.frame import Frame
from vigild.pipeline.branch import Branch
from vigild.plugin import Plugin

if TYPE_CHECKING:
    from vigild.pipeline.chain import Stage

log = logging.getLogger("vigild.chain")


def whole_beside(spec: PluginSpec) -> bool:
    """The chain runs the whole plugin beside it (a `Branch`): placed on a thread or in a process, unless the plugin
    `keeps_order` (then it runs in the chain and places its slow part itself)."""
    return spec.beside and not spec.cls.keeps_order


def in_own_process(spec: PluginSpec) -> bool:
    """The chain's instance is a stand-in for the plugin, which is built and run in a process of its own."""
    return whole_beside(spec) and spec.placement == "process"


class Runner(Protocol):
    """How the chain runs one stage (all its instances)."""

    def process(self, live: list[Frame]) -> set[int]:
        """Run (or hand over) the stage on the frames still live; the ids of those that failed."""
        ...

    def prefetch(self, frames: list[Frame]) -> list[Future[Any]]:
        """As the first stage: start the device work of the next batch (`Plugin.prefetch`)."""
        ...

    def close(self, plugin: Plugin, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        """`camera` sends no more frames to `plugin`: its closing events, for the caller to publish (none from a
        branch, which publishes its own in turn)."""
        ...


RunBatch = Callable[["Stage", Plugin, list[Frame]], set[int]]


class InChain:
    def __init__(self, stage: Stage, run: RunBatch, observe: Callable[[Stage, float, int], None]):
        self.stage = stage
        self._run = run
        self._observe = observe

    def process(self, live: list[Frame]) -> set[int]:
        stage = self.stage
        failed: set[int] = set()
        started = time.perf_counter()
        for plugin, cameras in stage.instances:
            batch = [frame for frame in live if frame.camera in cameras]
            if batch:
                failed.update(self._run(stage, plugin, batch))
        self._observe(stage, time.perf_counter() - started, sum(frame.camera in stage.cameras for frame in live))
        return failed

    def prefetch(self, frames: list[Frame]) -> list[Future[Any]]:
        started: list[Future[Any]] = []
        for plugin, cameras in self.stage.instances:
            batch = [frame for frame in frames if frame.camera in cameras]
            if batch:
                try:
                    work = plugin.prefetch(batch)
                except Exception:  # nothing is lost: `process` computes the batch itself
                    log.exception("plugin '%s' failed to start a batch ahead", self.stage.spec.id)
                    continue
                if work is not None:
                    started.append(work)
        return started

    def close(self, plugin: Plugin, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        try:
            return plugin.on_source_end(camera, ts_wall, frame_index)
        except Exception:
            log.exception("plugin '%s' failed to close camera %s", self.stage.spec.id, camera)
            return []


class Beside:
    def __init__(self, stage: Stage, branches: Mapping[int, Branch]):
        self.stage = stage
        self._branches = branches
        """The chain's branches by `id(plugin)` (a reload's chain takes some over)."""

    def process(self, live: list[Frame]) -> set[int]:
        for plugin, cameras in self.stage.instances:  # handed over, never waited for; the branch counts its time
            batch = [frame for frame in live if frame.camera in cameras]
            if batch:
                self._branches[id(plugin)].offer(batch)
        return set()

    def prefetch(self, frames: list[Frame]) -> list[Future[Any]]:
        return []

    def close(self, plugin: Plugin, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        self._branches[id(plugin)].close_camera(camera, ts_wall, frame_index)  # its events follow its frames
        return []
