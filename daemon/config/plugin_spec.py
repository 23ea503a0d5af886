"""One entry of a config's chain, resolved: what vigild.config.resolve makes of each `plugins:` entry and what the
pipeline's chain (vigild.pipeline.chain) makes plugin instances from. A module of its own, so that the pipeline
takes it without the YAML loader."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vigild.plugin import Plugin, PluginConfig


@dataclass(frozen=True)
class PluginSpec:
    """One entry of the chain, resolved: its class, its own config, and each camera's effective config."""

    id: str
    cls: type[Plugin]
    config: PluginConfig
    per_camera: Mapping[str, PluginConfig]
    """Effective config for each enabled camera that runs this plugin (with its overrides applied)."""

    @property
    def branch(self) -> bool:
        """Runs beside the chain (vigild.pipeline.branch): `branch:` in its entry, else the plugin's own default."""
        return bool(self.config.branch) if self.config.branch is not None else self.cls.branch_default

    @property
    def in_process(self) -> bool:
        """A whole branch in a process of its own (`branch: process`; vigild.pipeline.branch_process)."""
        return self.config.branch == "process"

    @property
    def whole_branch(self) -> bool:
        """The chain runs the whole plugin beside it (a `Branch`); a branch plugin that `splits` stays in the chain
        and runs its slow part on a worker of its own."""
        return self.branch and not self.cls.splits
