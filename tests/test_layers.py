"""The layers of docs/design.md#layers are an import contract ([tool.importlinter] in pyproject.toml) that `make lint`
checks: the tree as it is keeps it, and an upward import (capture or a plugin into the service, a plugin into the
outputs, the config into capture) breaks it, named by file and line.

lint-imports runs on a copy of the sources laid out as installed, plugins/ as vigild/plugins (`make lint` lays them
out so with links); it only parses the files, it imports none of them, so this takes a few seconds."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytest.importorskip("importlinter")

LINT_IMPORTS = "import sys\nfrom importlinter.cli import lint_imports_command\nsys.exit(lint_imports_command())\n"
LAYERS = "vigild's layers: each imports only those below it (docs/design.md#layers)"
PLUGINS = "Plugins give their events to the chain"


def installed_layout(tmp_path: Path) -> Path:
    """A copy of daemon/ as vigild/ and of plugins/ as vigild/plugins/, as pip installs them."""
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "daemon", tree / "vigild", ignore=ignore)
    shutil.copytree(ROOT / "plugins", tree / "vigild" / "plugins", ignore=ignore)
    return tree


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with the repository's contracts, on `tree` (its working directory: the `vigild` found first)."""
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )


def append(tree: Path, module: str, code: str) -> int:
    """Append `code` to vigild's `module` (a path under vigild/); the number of its last line, the import's."""
    path = tree / "vigild" / module
    text = path.read_text() + code + "\n"
    path.write_text(text)
    return text.count("\n")


def test_the_tree_keeps_the_layers(tmp_path):
    result = lint_imports(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout
    assert "vigild.plugins" not in result.stderr  # the plugins were there to be checked


def test_an_upward_import_breaks_the_contract(tmp_path):
    tree = installed_layout(tmp_path)
    upward = {
        ("capture/camera.py", "from vigild.service import daemon"): "vigild.capture.camera -> vigild.service.daemon",
        ("plugins/tracking/track_table.py", "from vigild.service import daemon"): (
            "vigild.plugins.tracking.track_table -> vigild.service.daemon"
        ),
        # below the plugins in the layers, but refused to them by the plugins' own contract
        ("plugins/analytics/geometry.py", "from vigild.outputs import publisher"): (
            "vigild.plugins.analytics.geometry -> vigild.outputs.publisher"
        ),
        # lazy imports count: one inside a function, as the config once took capture's back ends
        ("config/loading.py", "def _backends():\n    from vigild.capture import camera"): (
            "vigild.config.loading -> vigild.capture.camera"
        ),
    }
    expected = [f"{chain} (l.{append(tree, module, code)})" for (module, code), chain in upward.items()]

    result = lint_imports(tree)
    assert result.returncode != 0
    report = result.stdout
    assert f"{LAYERS} BROKEN" in report.replace("\n", ""), report
    assert f"{PLUGINS}" in report
    assert "Contracts: 0 kept, 2 broken." in report, report
    for line in expected:
        assert line in report, f"{line!r} not in:\n{report}"
    assert "vigild.capture is not allowed to import vigild.service" in report
    assert "vigild.plugins is not allowed to import vigild.service" in report
    assert "vigild.config is not allowed to import vigild.capture" in report
    assert "vigild.plugins is not allowed to import vigild.outputs" in report
