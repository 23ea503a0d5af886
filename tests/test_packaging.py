"""The package as users get it (issue 16): a wheel built from a copy of the checkout, installed (not editable) into a
fresh virtual environment, runs `vigild check` on every example config, finds the built-in plugins through their
entry points, and imports from the installed files, never from the checkout.

What differs from scripts/install-service.sh: the fresh environment takes its dependencies (torch and the rest,
5 GB) from the test's own environment through a .pth line instead of installing them again, and the wheel is
installed with --no-deps. Everything of vigild itself comes from the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, daemon_env

pytestmark = pytest.mark.e2e

EXAMPLES = sorted(path.name for path in (ROOT / "configs").glob("*.yaml"))
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the fresh environment's `bin` directory with the wheel installed in it)."""
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)  # pip builds in place: never in the checkout
    dist = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(dist), str(source)],
        check=True, timeout=600,
    )  # fmt: skip
    (wheel,) = dist.glob("vigild-*.whl")
    fresh = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True, timeout=300)
    purelib = Path(
        subprocess.run(
            [str(fresh / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()
    )  # fmt: skip
    (purelib / "zz-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(fresh / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        check=True, timeout=600,
    )  # fmt: skip
    return wheel, fresh / "bin"


@pytest.fixture
def installed(built) -> Path:
    return built[1]


def test_the_wheel_holds_every_module_and_declares_the_command_and_the_plugins(built):
    """Each module of daemon/ and plugins/ (and their subpackages) is in the wheel under its package name, with the
    `vigild` command and the built-in plugins' entry points (the names the docs and configs use)."""
    with zipfile.ZipFile(built[0]) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(name).decode() for name in names if name.endswith(".dist-info/entry_points.txt"))
    expected = {f"vigild/{path.relative_to(ROOT / 'daemon')}" for path in (ROOT / "daemon").rglob("*.py")}
    expected |= {f"vigild/plugins/{path.relative_to(ROOT / 'plugins')}" for path in (ROOT / "plugins").rglob("*.py")}
    # the web console's assets are package data (docs/web.md): no CDN, nothing fetched at run time
    expected |= {f"vigild/web/static/{path.name}" for path in (ROOT / "daemon" / "web" / "static").iterdir()}
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    assert {"vigild/web/static/index.html", "vigild/web/static/app.js"} <= names
    assert "vigild = vigild.cli:main" in entry_points
    for plugin in ("detector", "bytetrack", "botsort", "analytics", "action_recognizer", "semantic_segmenter"):
        assert f"{plugin} = vigild.plugins." in entry_points, (plugin, entry_points)


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_installed_command_checks_each_example_config(installed, example, tmp_path):
    env = daemon_env(DOOR_USER="viewer", DOOR_PASSWORD="x", CAM_USER="viewer", CAM_PASSWORD="x")
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(installed / "vigild"), "check", "--config", str(ROOT / "configs" / example)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{ROOT / 'configs' / example}: ok:" in result.stdout, result.stdout


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    env = daemon_env()
    env.pop("PYTHONPATH", None)
    probe = (
        "import vigild, vigild.plugins.detection.detector as d, vigild.client as c\n"
        "from vigild.config.registry import load_plugin_class\n"
        "print(vigild.__file__); print(d.__file__); print(load_plugin_class('detector').__module__)\n"
    )
    result = subprocess.run(
        [str(installed / "python"), "-c", probe], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    package, detector, plugin_module = result.stdout.split()
    venv = installed.parent
    assert Path(package).is_relative_to(venv) and Path(detector).is_relative_to(venv), result.stdout
    assert not Path(package).is_relative_to(ROOT)
    assert plugin_module == "vigild.plugins.detection.detector"
