"""One entry of a config's chain, resolved: what vigild.config.resolve makes of each `plugins:` entry and what the
pipeline's chain (vigild.pipeline.chain) makes plugin instances from. A module of its own, so that the pipeline
takes it without the YAML loader."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vigild.plugin import Placement, Plugin, PluginConfig


@dataclass(frozen=True)
class PluginSpec:
    """One entry of the chain, resolved: its class, its own config, and each camera's effective config."""

    id: str
    cls: type[Plugin]
    config: PluginConfig
    per_camera: Mapping[str, PluginConfig]
    """Effective config for each enabled camera that runs this plugin (with its overrides applied)."""

    @property
    def placement(self) -> Placement:
        """Where it runs: its entry's `placement:` (or `branch:`), else the plugin's default."""
        return self.config.requested_placement or self.cls.placements[0]

    @property
    def beside(self) -> bool:
        """It runs beside the chain (on a thread or in a process): what it adds to a frame never reaches the
        plugins after it."""
        return self.placement != "chain"
