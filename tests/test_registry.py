"""Third-party plugins through the `vigild.plugins` entry-point group, as an installed package provides them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT, VTEST, daemon_env, install_fake_distribution

CROWD = """
from typing import Literal
from vigild.plugin import Plugin, PluginConfig

class CrowdConfig(PluginConfig):
    type: Literal["crowd"] = "crowd"
    min_people: int = 10

class Crowd(Plugin[CrowdConfig]):
    Config = CrowdConfig
    def process(self, frames):
        pass
"""


def check(site: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = daemon_env(PYTHONPATH=str(site))
    return subprocess.run(
        [sys.executable, "-m", "vigild", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )


def config_with(tmp_path: Path, plugins: str) -> Path:
    path = tmp_path / "vigild.yaml"
    path.write_text(f"cameras:\n  door:\n    source: {VTEST}\nplugins:\n{textwrap.indent(plugins, '  ')}")
    return path


def test_third_party_plugin_is_found_and_its_config_validated(tmp_path):
    site = tmp_path / "site"
    install_fake_distribution(site, "crowd = acme_crowd:Crowd\n", {"acme_crowd": CROWD})
    ok = check(site, config_with(tmp_path, "- type: crowd\n  min_people: 12\n"))
    assert ok.returncode == 0, ok.stderr
    assert "crowd (crowd)" in ok.stdout
    bad = check(site, config_with(tmp_path, "- type: crowd\n  min_peeple: 12\n"))
    assert bad.returncode == 2 and "plugins.0.min_peeple: unknown key (allowed: type, id, placement, branch, branch_share, min_people)" in bad.stderr


def test_a_configured_plugin_that_fails_to_import_stops_the_daemon(tmp_path):
    site = tmp_path / "site"
    install_fake_distribution(
        site, "broken = acme_broken:Broken\n", {"acme_broken": "import does_not_exist_anywhere\n"}
    )
    result = check(site, config_with(tmp_path, "- type: broken\n"))
    assert result.returncode == 2
    assert "plugins.0.type: plugin 'broken' (acme_broken:Broken) failed to import: ModuleNotFoundError" in result.stderr


def test_an_installed_but_unused_broken_plugin_does_not_matter(tmp_path):
    site = tmp_path / "site"
    install_fake_distribution(site, "broken = acme_broken:Broken\n", {"acme_broken": "raise RuntimeError('boom')\n"})
    result = check(site, config_with(tmp_path, "- type: detector\n  weights: yolov8n.pt\n- type: bytetrack\n"))
    assert result.returncode == 0, result.stderr
