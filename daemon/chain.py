"""The plugin chain: each configured plugin, in order, over each batch of frames.

Cameras whose effective config of a plugin is the same share one instance (one model serving them all, one
batch); a camera with overrides gets an instance of its own. A plugin that raises on a batch is retried frame by
frame so that only the frame that fails is logged (with its camera) and left out of the rest of the chain.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from vigild.config import CameraConfig, PluginSpec
from vigild.events import Event
from vigild.frame import Frame
from vigild.plugin import FrameErrors, Plugin, PluginConfig, PluginContext

log = logging.getLogger("vigild.chain")

FAILURE_LOG_INTERVAL_S = 10.0


@dataclass
class Stage:
    spec: PluginSpec
    instances: list[tuple[Plugin, frozenset[str]]]
    seconds: float = 0.0
    failures: Counter[str] = field(default_factory=Counter)


class PluginStartError(Exception):
    def __init__(self, plugin_id: str, position: int, cause: BaseException):
        self.plugin_id = plugin_id
        self.position = position
        self.cause = cause
        super().__init__(f"plugin '{plugin_id}' (plugins.{position}) failed to start: {type(cause).__name__}: {cause}")


class Chain:
    def __init__(
        self,
        specs: tuple[PluginSpec, ...],
        device: str,
        cameras: Mapping[str, CameraConfig],
        torch_threads: int | None = None,
    ):
        self.stages: list[Stage] = []
        for position, spec in enumerate(specs):
            groups: dict[str, tuple[PluginConfig, set[str]]] = {}
            for camera, config in spec.per_camera.items():
                key = config.model_dump_json()
                groups.setdefault(key, (config, set()))[1].add(camera)
            instances = []
            for config, served in groups.values():
                context = PluginContext(device, {name: cameras[name] for name in sorted(served)}, torch_threads)
                try:
                    instances.append((spec.cls(config, context), frozenset(served)))
                except Exception as exc:
                    raise PluginStartError(spec.id, position, exc) from exc
            self.stages.append(Stage(spec, instances))
        self._last_failure_log: dict[tuple[str, str], float] = {}

    def start(self) -> None:
        for position, stage in enumerate(self.stages):
            for plugin, _ in stage.instances:
                try:
                    plugin.start()
                except Exception as exc:
                    self.stop()
                    raise PluginStartError(stage.spec.id, position, exc) from exc

    def stop(self) -> None:
        for stage in self.stages:
            for plugin, _ in stage.instances:
                try:
                    plugin.stop()
                except Exception:
                    log.exception("plugin '%s' failed to stop cleanly", stage.spec.id)

    def process(self, frames: list[Frame]) -> list[Frame]:
        """Run every stage; returns the frames that came through without a plugin failure."""
        live = frames
        for stage in self.stages:
            failed: set[int] = set()
            started = time.perf_counter()
            for plugin, cameras in stage.instances:
                batch = [frame for frame in live if frame.camera in cameras]
                if batch:
                    failed.update(self._run(stage, plugin, batch))
            stage.seconds += time.perf_counter() - started
            if failed:
                live = [frame for frame in live if id(frame) not in failed]
        return live

    def source_ended(self, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        events: list[Event] = []
        for stage in self.stages:
            for plugin, cameras in stage.instances:
                if camera in cameras:
                    try:
                        events.extend(plugin.on_source_end(camera, ts_wall, frame_index))
                    except Exception:
                        log.exception("plugin '%s' failed to close camera %s", stage.spec.id, camera)
        return events

    def _run(self, stage: Stage, plugin: Plugin, batch: list[Frame]) -> set[int]:
        if plugin.batched and len(batch) > 1:
            try:
                plugin.process(batch)
                return set()
            except FrameErrors as errors:  # the plugin did the rest of the batch and names the bad frames
                for position, exc in errors.errors.items():
                    self._report(stage, batch[position], exc)
                return {id(batch[position]) for position in errors.errors}
            except Exception:  # run again frame by frame below, to find and report the bad frame(s)
                pass
        return {failed for frame in batch for failed in self._run_one(stage, plugin, frame)}

    def _run_one(self, stage: Stage, plugin: Plugin, frame: Frame) -> set[int]:
        try:
            plugin.process([frame])
            return set()
        except FrameErrors as errors:
            self._report(stage, frame, next(iter(errors.errors.values())))
            return {id(frame)}
        except Exception as exc:
            self._report(stage, frame, exc)
            return {id(frame)}

    def _report(self, stage: Stage, frame: Frame, exc: Exception) -> None:
        stage.failures[frame.camera] += 1
        key = (stage.spec.id, frame.camera)
        now = time.monotonic()
        if now - self._last_failure_log.get(key, -FAILURE_LOG_INTERVAL_S) >= FAILURE_LOG_INTERVAL_S:
            self._last_failure_log[key] = now
            log.error(
                "plugin '%s' failed on camera %s frame %d (%d failures on this camera so far): %s: %s",
                stage.spec.id,
                frame.camera,
                frame.index,
                stage.failures[frame.camera],
                type(exc).__name__,
                exc,
                exc_info=stage.failures[frame.camera] == 1,
            )


def failures_by_camera(chain: Chain) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for stage in chain.stages:
        for camera, count in dict(stage.failures).items():  # a copy: the scheduler thread may add a camera
            total[camera] += count
    return dict(total)
