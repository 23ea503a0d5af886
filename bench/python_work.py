"""A bench plugin (not a fake of anything real): `python_work` spends `work_ms` a frame in pure Python, holding the
interpreter as a tracker or a rule engine written in Python would. bench/branches.py installs it through the
`vigild.plugins` entry point (a minimal .dist-info on `sys.path`) to compare `branch: true` with `branch: process`."""

from __future__ import annotations

import time
from typing import Literal

from vigild.events import Event
from vigild.frame import Frame
from vigild.plugin import Plugin, PluginConfig


class PythonWorkConfig(PluginConfig):
    type: Literal["python_work"] = "python_work"
    work_ms: float = 50.0


class PythonWork(Plugin[PythonWorkConfig]):
    Config = PythonWorkConfig
    placements = ("thread", "process", "chain")

    def process(self, frames: list[Frame]) -> None:
        for frame in frames:  # a bench of Python work: the loop is the point
            deadline = time.thread_time() + self.config.work_ms / 1000
            total = 0
            while time.thread_time() < deadline:
                total += sum(range(200))
            frame.events.append(Event("python_work", frame.camera, frame.ts_wall, frame.index, data={"n": total}))


def install(site: str) -> None:
    """Make `python_work` findable through the entry point group, for this process and the branch's children."""
    import shutil
    import sys
    from pathlib import Path

    info = Path(site) / "bench_python_work-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-python-work\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vigild.plugins]\npython_work = python_work:PythonWork\n")
    shutil.copy(Path(__file__), Path(site) / "python_work.py")
    if site not in sys.path:
        sys.path.insert(0, site)
