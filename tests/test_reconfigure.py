"""A configuration change computed and made ready without a daemon (issue 16): `reconfigure` works on the running
state as a value and on the pipeline's parts, and returns the new state for its caller to commit. Refused, it leaves
every running part as it was; accepted, the old state is still the old one until the commit, and the plugin
instances taken over serve their new cameras through a new, read-only context. Real parts: captures of a file,
an exchange, a chain with a test plugin, a scheduler and a publisher that are not started (a scheduler call runs
inline, the publisher only queues)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from conftest import VTEST

from vigild.capture.exchange import FrameExchange
from vigild.config.loading import Config, ConfigError, PluginSpec, load_config
from vigild.frame import Frame
from vigild.outputs.bus import EventBus
from vigild.outputs.publisher import Publisher
from vigild.pipeline.chain import Chain
from vigild.pipeline.scheduler import Scheduler
from vigild.plugin import Plugin, PluginConfig
from vigild.service.reconfigure import reconfigure
from vigild.service.running import Pipeline, Running
from vigild.service.threads import choose_threads

IMAGE = np.zeros((4, 4, 3), np.uint8)


class StepConfig(PluginConfig):
    type: Literal["step"] = "step"
    fail_start: bool = False


class StepPlugin(Plugin[StepConfig]):
    """A test plugin: fails to start when told to, and notes whether it was stopped."""

    Config = StepConfig

    def start(self) -> None:
        if self.config.fail_start:
            raise RuntimeError("cannot load its model")
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def process(self, frames: list[Frame]) -> None:
        pass


def config(tmp_path: Path, cameras: dict[str, str], *plugins: tuple[str, StepConfig]) -> Config:
    """A config of `cameras` (name: extra YAML of the camera) reading the test video, with the `plugins` (id, config)
    on every camera."""
    yaml = "".join(f"  {name}:\n    source: {VTEST}\n    loop: true\n{extra}" for name, extra in cameras.items())
    path = tmp_path / "vigild.yaml"
    path.write_text(f"cameras:\n{yaml}")
    loaded = load_config(path)
    chain = tuple(PluginSpec(id_, StepPlugin, c, dict.fromkeys(cameras, c)) for id_, c in plugins)
    return dataclasses.replace(loaded, chain=chain)


@pytest.fixture
def running(tmp_path: Path):
    old = config(tmp_path, {"a": "", "b": ""}, ("step", StepConfig()))
    exchange = FrameExchange()
    publisher = Publisher(old.settings.publisher)
    chain = Chain(old.chain, "cpu", old.cameras)
    chain.start()
    bus = EventBus()
    bus.attach(publisher)
    scheduler = Scheduler(old.settings.scheduler, exchange, chain, bus.publish, list(old.cameras))
    pipeline = Pipeline(exchange, scheduler, publisher, "cpu", choose_threads(1), bus=bus)
    state = Running(old, chain, {name: pipeline.capture(old, name) for name in old.cameras})
    for capture in state.captures.values():
        capture.start()
    started = list(state.captures.values())
    yield state, pipeline, started
    for capture in started:
        capture.stop()
    exchange.close()
    for capture in started:
        if capture.is_alive():
            capture.join(5)


def test_a_refused_change_leaves_every_running_part_as_it_was(tmp_path: Path, running):
    state, pipeline, _ = running
    ((plugin, _),) = state.chain.stages[0].instances
    # camera b changed and a second plugin that fails to start: refused while preparing, before any swap
    new = config(
        tmp_path,
        {"a": "", "b": "    stall_timeout: 30\n"},
        ("step", StepConfig()),
        ("second", StepConfig(fail_start=True)),
    )
    with pytest.raises(ConfigError, match="failed to start"):
        reconfigure(state, new, pipeline, timeout=5)
    assert pipeline.scheduler.chain is state.chain and pipeline.scheduler.cameras == ["a", "b"]
    assert all(capture.is_alive() for capture in state.captures.values())  # b was not restarted
    assert all(pipeline.exchange.put(Frame(name, 10**6, 0.0, 0.0, IMAGE)) for name in "ab")  # neither retired
    assert not plugin.stopped and dict(plugin.context.cameras).keys() == {"a", "b"}
    assert pipeline.publisher.stats.queued == 0  # no camera.down, nothing closed


def test_an_accepted_change_is_a_new_state_for_the_caller_to_commit(tmp_path: Path, running):
    state, pipeline, started = running
    ((kept, _),) = state.chain.stages[0].instances
    new = config(tmp_path, {"a": "", "b": "    stall_timeout: 30\n", "c": ""}, ("step", StepConfig()))
    change = reconfigure(state, new, pipeline, timeout=5)
    started.extend(change.starting)

    assert change.result.as_dict()["cameras"] == {"added": ["c"], "removed": [], "restarted": ["b"], "unchanged": ["a"]}
    assert change.result.plugins_kept == ["step"] and change.result.plugins_started == []
    # the old state is untouched (the caller still holds it until it commits); the new one shares what stayed
    assert state.config.cameras.keys() == {"a", "b"} and state.captures.keys() == {"a", "b"}
    assert change.running.captures["a"] is state.captures["a"] and state.captures["a"].is_alive()
    assert change.running.captures["b"] is not state.captures["b"] and not state.captures["b"].is_alive()
    assert [c.name for c in change.starting] == ["c", "b"] and not any(c.is_alive() for c in change.starting)
    # the scheduler took over the new chain; the instance it kept serves a, b and c through a read-only context
    assert pipeline.scheduler.chain is change.running.chain and pipeline.scheduler.cameras == ["a", "b", "c"]
    ((instance, _),) = change.running.chain.stages[0].instances
    assert instance is kept and not kept.stopped
    assert dict(kept.context.cameras) == dict(new.cameras)
    with pytest.raises(TypeError):
        kept.context.cameras["d"] = new.cameras["a"]  # type: ignore[index]
    event = pipeline.publisher._queue.popleft().event  # what the scheduler published: b closed, as reconfigured
    assert (event.type, event.camera, event.data["reason"]) == ("camera.down", "b", "reconfigured")
    assert not pipeline.publisher._queue
