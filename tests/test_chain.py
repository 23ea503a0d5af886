"""The chain: instance grouping by per-camera config, and isolation of a plugin that fails on one frame."""

from __future__ import annotations

import logging
import time
from typing import ClassVar, Literal

import numpy as np

from vigild.config.loading import CameraConfig, PluginSpec
from vigild.frame import Frame
from vigild.pipeline.chain import Chain
from vigild.plugin import FrameErrors, Plugin, PluginConfig

IMAGE = np.zeros((4, 4, 3), np.uint8)


class BrittleConfig(PluginConfig):
    type: Literal["brittle"] = "brittle"
    fail_on: str = ""


class BrittlePlugin(Plugin[BrittleConfig]):
    """A test plugin (not a fake of anything real): raises on frames of one camera, marks the others."""

    Config = BrittleConfig
    repeatable = True  # stateless per frame, like a detector
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
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    # the failed batch and the frame that failed again are each logged once; the second failure of frame b within
    # 10 s is counted, not logged (rate limit)
    assert len(errors) == 2, errors
    assert "plugin 'first' failed on a batch of 3 frames" in errors[0] and "frame by frame" in errors[0]
    assert "plugin 'first' failed on camera b frame 0" in errors[1]
    assert chain.stages[0].batch_failures == 1 and chain.stages[1].batch_failures == 0


class FlakyConfig(PluginConfig):
    type: Literal["flaky"] = "flaky"


class FlakyPlugin(Plugin[FlakyConfig]):
    """A test plugin, stateless per frame (repeatable), that raises on the first batch only (a transient error)."""

    Config = FlakyConfig
    repeatable = True

    def start(self) -> None:
        self.calls = 0

    def process(self, frames: list[Frame]) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("transient")
        for frame in frames:
            frame.events.append("flaky")  # type: ignore[arg-type]


def test_a_repeatable_plugin_whose_rerun_succeeds_still_has_its_failure_counted_and_logged(caplog):
    config = FlakyConfig()
    chain = Chain((PluginSpec("flaky", FlakyPlugin, config, dict.fromkeys("abc", config)),), "cpu", CAMS)
    chain.start()
    batch = frames("a", "b", "c")
    with caplog.at_level(logging.ERROR, logger="vigild.chain"):
        passed = chain.process(batch)
    assert [f.camera for f in passed] == ["a", "b", "c"] and all(f.events == ["flaky"] for f in batch)
    assert chain.stages[0].batch_failures == 1 and not chain.stages[0].failures  # no frame lost, one batch failed
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "plugin 'flaky' failed on a batch of 3 frames" in error.getMessage() and "transient" in error.getMessage()


class TubesConfig(PluginConfig):
    type: Literal["tubes"] = "tubes"
    fail_on: str = ""
    named: bool = False


class TubesPlugin(Plugin[TubesConfig]):
    """A test plugin with state across frames, like the action recognizer: appends each frame to its camera's tube,
    then raises on camera `fail_on` after the work is done (named with FrameErrors when `named`)."""

    Config = TubesConfig

    def start(self) -> None:
        self.tubes: dict[str, list[int]] = {}
        self.calls: list[list[str]] = []

    def process(self, frames: list[Frame]) -> None:
        self.calls.append([f.camera for f in frames])
        for frame in frames:
            self.tubes.setdefault(frame.camera, []).append(frame.index)
        bad = {i: RuntimeError("bad crop") for i, f in enumerate(frames) if f.camera == self.config.fail_on}
        if bad:
            raise FrameErrors(bad) if self.config.named else RuntimeError("bad crop")


def tubes_chain(config: TubesConfig) -> tuple[Chain, TubesPlugin]:
    chain = Chain((PluginSpec("tubes", TubesPlugin, config, dict.fromkeys("abc", config)),), "cpu", CAMS)
    chain.start()
    ((plugin, _),) = chain.stages[0].instances
    return chain, plugin


def test_a_stateful_plugin_is_never_run_twice_on_a_frame_its_failed_batch_fails_whole(caplog):
    chain, plugin = tubes_chain(TubesConfig(fail_on="b"))
    with caplog.at_level(logging.ERROR, logger="vigild.chain"):
        passed = chain.process(frames("a", "b", "c"))
    assert plugin.calls == [["a", "b", "c"]]  # no rerun frame by frame
    assert plugin.tubes == {"a": [0], "b": [0], "c": [0]}  # no frame written into its state twice
    assert passed == []
    assert chain.stages[0].failures == {"a": 1, "b": 1, "c": 1} and chain.stages[0].batch_failures == 1
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 3 and all("the whole batch of 3 failed" in m and "bad crop" in m for m in logged)


def test_a_stateful_plugin_that_names_its_bad_frames_loses_only_those():
    chain, plugin = tubes_chain(TubesConfig(fail_on="b", named=True))
    passed = chain.process(frames("a", "b", "c"))
    assert plugin.calls == [["a", "b", "c"]]
    assert [f.camera for f in passed] == ["a", "c"]
    assert chain.stages[0].failures == {"b": 1} and chain.stages[0].batch_failures == 0


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


def test_failure_counts_carry_over_a_new_chain_but_not_for_cameras_it_no_longer_has():
    BrittlePlugin.instances.clear()
    failing = BrittleConfig(id="first", fail_on="b")
    old = Chain((spec("first", dict.fromkeys("ab", failing)),), "cpu", {k: CAMS[k] for k in "ab"})
    old.start()
    old.process(frames("a", "b"))
    old.process(frames("b"))
    assert dict(old.stages[0].failures) == {"b": 2}
    kept = Chain((spec("first", dict.fromkeys("ab", failing)),), "cpu", {k: CAMS[k] for k in "ab"}, reuse=old)
    kept.activate()
    assert dict(kept.stages[0].failures) == {"b": 2}  # a reload that keeps camera b keeps its count
    without_b = Chain((spec("first", {"a": failing}),), "cpu", {"a": CAMS["a"]}, reuse=kept)
    without_b.activate()
    assert dict(without_b.stages[0].failures) == {}
    assert without_b.stages[0].total_failures == 2  # the plugin's own total (a Prometheus counter) never goes down
    again = Chain((spec("first", dict.fromkeys("ab", failing)),), "cpu", {k: CAMS[k] for k in "ab"}, reuse=without_b)
    again.activate()
    again.process(frames("b"))
    assert dict(again.stages[0].failures) == {"b": 1}  # camera b added again starts from zero
    assert again.stages[0].total_failures == 3
