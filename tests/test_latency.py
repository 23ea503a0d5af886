"""Latency stays flat when the chain is slower than the camera: the daemon works on the newest frame, drops
the ones it has no time for, and counts them, instead of queueing frames and falling further behind."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from conftest import free_endpoint

from vigild.config.loading import PluginSpec, load_config
from vigild.frame import Frame
from vigild.plugin import Plugin, PluginConfig
from vigild.service.daemon import Daemon

CHAIN_S = 0.3
FRAME_INTERVAL_S = 0.1  # the RTSP server streams vtest at its 10 fps


class SleepConfig(PluginConfig):
    type: Literal["sleep"] = "sleep"
    seconds: float = CHAIN_S


class SleepPlugin(Plugin[SleepConfig]):
    """A test plugin, not a fake: a chain stage that takes `seconds` per frame, like a model too big for the
    machine, and notes how old each frame is when it is done with it."""

    Config = SleepConfig
    batched = False
    ages: ClassVar[list[float]] = []

    def process(self, frames: list[Frame]) -> None:
        time.sleep(self.config.seconds)
        now = time.monotonic()
        SleepPlugin.ages.extend(now - frame.ts_mono for frame in frames)


@pytest.mark.parametrize("backend", ["gstreamer", "opencv"])
def test_frame_age_stays_flat_behind_a_slow_chain_and_drops_are_counted(tmp_path: Path, rtsp_server, backend):
    path = tmp_path / "vigild.yaml"
    path.write_text(
        f"cameras:\n  cam:\n    source: {rtsp_server.url('/h264')}\n    backend: {backend}\n"
        f"publisher:\n  endpoint: {free_endpoint()}\n"
    )
    config = load_config(path)
    slow = SleepConfig()
    config = dataclasses.replace(config, chain=(PluginSpec("sleep", SleepPlugin, slow, {"cam": slow}),))
    SleepPlugin.ages.clear()
    daemon = Daemon(config)
    daemon.start()
    try:
        deadline = time.monotonic() + 30
        while len(SleepPlugin.ages) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        camera = daemon._heartbeat().data["cameras"]["cam"]
    finally:
        daemon.stop()
    ages = SleepPlugin.ages[2:]  # the first frames of a connection may wait for the decoder to warm up
    assert len(ages) >= 15
    bound = 2 * FRAME_INTERVAL_S + CHAIN_S
    assert max(ages) < bound, f"frame ages {[round(a, 3) for a in ages]} exceed {bound} s"
    # the chain takes 3 frame intervals per frame: about 2 of every 3 frames are dropped, and counted
    assert camera["drops"] >= len(ages), camera
    assert camera["frames"] >= len(ages)
