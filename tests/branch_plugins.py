"""Test plugins for branches in a process of their own (importable by the branch's child process, which gets the
test run's `sys.path`). Not fakes of anything real: plugins that report where and how they ran."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Literal

from vigild.events import Event
from vigild.frame import Frame
from vigild.plugin import FrameErrors, Plugin, PluginConfig


class WhereConfig(PluginConfig):
    type: Literal["where"] = "where"
    hang_when: str | None = None
    """While this file exists, `process` holds its batch (and touches `held_file`), like a slow model."""
    held_file: str | None = None
    fail_index: int | None = None
    """A frame with this index fails (FrameErrors); the others of its batch go on."""
    fail_start: bool = False


class Where(Plugin[WhereConfig]):
    """One `seen` event per frame with the pid, nice value and torch thread count it ran with and the detections'
    count as the frame reached it; a `closing` event per camera. Pure Python: it holds the interpreter."""

    Config = WhereConfig
    placements = ("chain", "thread", "process")

    def start(self) -> None:
        if self.config.fail_start:
            raise RuntimeError("the model file is not there (a test plugin's start failure)")
        self.frames_seen = 0

    def process(self, frames: list[Frame]) -> None:
        import torch

        while self.config.hang_when and Path(self.config.hang_when).exists():
            if self.config.held_file:
                Path(self.config.held_file).touch()
            time.sleep(0.02)
        bad = {}
        for position, frame in enumerate(frames):
            if frame.index == self.config.fail_index:
                bad[position] = ValueError(f"frame {frame.index} is bad")
                continue
            self.frames_seen += 1
            data = {
                "pid": os.getpid(),
                "nice": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                "torch_threads": torch.get_num_threads(),
                "n": len(frame.detections),
                "seen": self.frames_seen,
                "cameras": sorted(self.context.cameras),
            }
            frame.events.append(Event("seen", frame.camera, frame.ts_wall, frame.index, data=data))
        if bad:
            raise FrameErrors(bad)

    def on_source_end(self, camera: str, ts_wall: float, frame_index: int) -> list[Event]:
        return [Event("closing", camera, ts_wall, frame_index if frame_index >= 0 else None, data={"pid": os.getpid()})]
