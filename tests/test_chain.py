"""The chain: instance grouping by per-camera config, and isolation of a plugin that fails on one frame."""

from __future__ import annotations

import logging
import time
from typing import ClassVar, Literal

import numpy as np

from vigild.chain import Chain
from vigild.config import CameraConfig, PluginSpec
from vigild.frame import Frame
from vigild.plugin import Plugin, PluginConfig

IMAGE = np.zeros((4, 4, 3), np.uint8)


class BrittleConfig(PluginConfig):
    type: Literal["brittle"] = "brittle"
    fail_on: str = ""


class BrittlePlugin(Plugin[BrittleConfig]):
    """A test plugin (not a fake of anything real): raises on frames of one camera, marks the others."""

    Config = BrittleConfig
    instances: ClassVar[list[BrittlePlugin]] = []

    def start(self) -> None:
        self.batches: list[list[str]] = []
        BrittlePlugin.instances.append(self)

    def process(self, frames: list[Frame]) -> None:
        self.batches.append([f.camera for f in frames])
        for frame in frames:
            if frame.camera == self.config.fail_on:
                raise RuntimeError("corrupt frame")
        for frame in frames:
            frame.events.append(f"seen by {self.config.id or self.config.type}")  # type: ignore[arg-type]


def spec(plugin_id: str, per_camera: dict[str, BrittleConfig]) -> PluginSpec:
    return PluginSpec(plugin_id, BrittlePlugin, next(iter(per_camera.values())), per_camera)


def frames(*cameras: str) -> list[Frame]:
    return [Frame(c, 0, time.time(), time.monotonic(), IMAGE) for c in cameras]


CAMS = {name: CameraConfig(source=f"{name}.mp4") for name in ["a", "b", "c"]}


def test_cameras_with_the_same_config_share_one_instance_and_one_batch():
    BrittlePlugin.instances.clear()
    base = BrittleConfig(id="first")
    override = BrittleConfig(id="first", fail_on="zzz")
    chain = Chain((spec("first", {"a": base, "b": base, "c": override}),), "cpu", CAMS)
    chain.start()
    chain.process(frames("a", "b", "c"))
    shared, own = BrittlePlugin.instances
    assert shared.batches == [["a", "b"]]
    assert own.batches == [["c"]]
    assert shared.context.cameras.keys() == {"a", "b"}


def test_plugin_failing_on_one_camera_spares_the_others(caplog):
    BrittlePlugin.instances.clear()
    first = BrittleConfig(id="first", fail_on="b")
    second = BrittleConfig(id="second")
    chain = Chain(
        (spec("first", dict.fromkeys("abc", first)), spec("second", dict.fromkeys("abc", second))), "cpu", CAMS
    )
    chain.start()
    batch = frames("a", "b", "c")
    with caplog.at_level(logging.ERROR, logger="vigild.chain"):
        passed = chain.process(batch)
        chain.process(frames("b"))
    assert [f.camera for f in passed] == ["a", "c"]
    assert batch[0].events == ["seen by first", "seen by second"]
    assert batch[1].events == []  # the failing frame goes no further down the chain
    assert chain.stages[0].failures == {"b": 2}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # rate-limited: the second failure within 10 s is counted, not logged
    assert "plugin 'first' failed on camera b frame 0" in errors[0].getMessage()


class CountingConfig(PluginConfig):
    type: Literal["counting"] = "counting"


class CountingTracker(Plugin[CountingConfig]):
    """A test plugin with per-camera state, like a tracker: counts the frames it saw, fails on camera b."""

    Config = CountingConfig
    batched = False

    def start(self) -> None:
        self.seen: list[str] = []

    def process(self, frames: list[Frame]) -> None:
        assert len(frames) == 1, "an unbatched plugin gets one frame a call"
        self.seen.append(frames[0].camera)
        if frames[0].camera == "b":
            raise RuntimeError("bad state")


def test_unbatched_plugin_sees_each_frame_exactly_once_even_when_one_fails():
    config = CountingConfig()
    chain = Chain((PluginSpec("counting", CountingTracker, config, dict.fromkeys("abc", config)),), "cpu", CAMS)
    chain.start()
    passed = chain.process(frames("a", "b", "c"))
    ((plugin, _),) = chain.stages[0].instances
    assert plugin.seen == ["a", "b", "c"]  # no frame repeated by a retry
    assert [f.camera for f in passed] == ["a", "c"]
