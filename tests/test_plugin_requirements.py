"""Plugins declare what they require and provide (issue 16, point 2): a chain that cannot give a plugin what it needs
for some camera is a config error naming the file, line, key and camera, from `load_config`, `vigild check` and a
control client's `cameras add`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import service as service_module
from conftest import ROOT, VTEST, daemon_env, free_endpoint, install_fake_distribution

from vigild.config.loading import ConfigError, load_config, with_camera

# Plugins of a third-party package, declaring needs in the words of vigild.plugin.CAPABILITIES: a stand-in for a
# detector, one for a tracker, and one that, like the action recognizer, needs tracks only in one of its modes.
REQUIRING = '''
from typing import Literal

from vigild.plugin import Plugin, PluginConfig


class FindsConfig(PluginConfig):
    type: Literal["finds"] = "finds"


class Finds(Plugin[FindsConfig]):
    Config = FindsConfig
    provides = frozenset({"detections"})

    def process(self, frames):
        pass


class FollowsConfig(PluginConfig):
    type: Literal["follows"] = "follows"
    tag: str = ""


class Follows(Plugin[FollowsConfig]):
    Config = FollowsConfig
    requires = frozenset({"detections"})
    provides = frozenset({"tracks"})
    placements = ("chain", "thread", "process")  # (to show that beside the chain it provides nothing to later plugins)

    def process(self, frames):
        pass


class WatchesConfig(PluginConfig):
    type: Literal["watches"] = "watches"
    mode: Literal["tracks", "frame"] = "tracks"


class Watches(Plugin[WatchesConfig]):
    Config = WatchesConfig
    provides = frozenset({"actions"})

    @classmethod
    def requirements(cls, config):
        return frozenset({"tracks"}) if config.mode == "tracks" else frozenset()

    def process(self, frames):
        pass
'''
ENTRY_POINTS = "finds = acme_requiring:Finds\nfollows = acme_requiring:Follows\nwatches = acme_requiring:Watches\n"


def requiring_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    install_fake_distribution(site, ENTRY_POINTS, {"acme_requiring": REQUIRING})
    return site


@pytest.fixture
def requiring(tmp_path, monkeypatch):
    """The package above installed on this interpreter's path, found through the entry points as any plugin is."""
    monkeypatch.syspath_prepend(str(requiring_site(tmp_path)))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vigild.yaml"
    path.write_text(text)
    return path


TWO_CAMERAS = f"cameras:\n  door:\n    source: {VTEST}\n  yard:\n    source: {VTEST}\n"


def test_a_plugin_with_no_tracker_before_it_is_an_error_naming_key_line_and_camera(tmp_path, requiring):
    path = write(tmp_path, TWO_CAMERAS + "plugins:\n  - type: finds\n  - type: watches\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (
        f"{path}:8: plugins.1: watches on cameras door, yard needs tracks, which no plugin before it provides "
        "(add a tracker before it)"
    )


def test_a_provider_after_the_plugin_is_named_and_the_order_is_the_fix(tmp_path, requiring):
    path = write(tmp_path, TWO_CAMERAS + "plugins:\n  - type: finds\n  - type: watches\n  - type: follows\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (
        f"{path}:8: plugins.1: watches on cameras door, yard needs tracks, which no plugin before it provides "
        "(follows (plugins.2) provides it: put it before watches)"
    )


def test_a_tracker_disabled_for_one_camera_is_an_error_at_that_cameras_override(tmp_path, requiring):
    path = write(
        tmp_path,
        f"cameras:\n  door:\n    source: {VTEST}\n  yard:\n    source: {VTEST}\n"
        "    plugins:\n      follows:\n        enabled: false\n"
        "plugins:\n  - type: finds\n  - type: follows\n  - type: watches\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (
        f"{path}:8: cameras.yard.plugins.follows.enabled: watches (plugins.2) needs tracks on camera yard, which "
        "follows (plugins.1) provides, but not for this camera (enable follows for it, or disable watches for it too)"
    )


def test_what_a_branch_provides_never_reaches_later_plugins(tmp_path, requiring):
    chain = "plugins:\n  - type: finds\n  - type: follows\n    branch: true\n  - type: watches\n"
    path = write(tmp_path, TWO_CAMERAS + chain)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (
        f"{path}:9: plugins.1.branch: watches (plugins.2) needs tracks, which follows (plugins.1) provides only beside "
        "the chain (thread): what a plugin beside the chain adds to a frame never reaches later plugins (set "
        "`placement: chain` on it)"
    )
    chain = "plugins:\n  - type: finds\n  - type: follows\n    placement: process\n  - type: watches\n"
    path = write(tmp_path, TWO_CAMERAS + chain)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:9: plugins.1.placement: watches (plugins.2) needs tracks"), info.value


def test_only_a_plugin_that_can_runs_as_a_branch_and_never_per_camera(tmp_path, requiring):
    path = write(tmp_path, TWO_CAMERAS + "plugins:\n  - type: finds\n    branch: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(
        f"{path}:8: plugins.0.branch: plugin type 'finds' cannot run beside the chain (thread): later plugins need"
    )
    text = (
        f"cameras:\n  door:\n    source: {VTEST}\n    plugins:\n      follows: {{branch: true}}\n"
        "plugins:\n  - type: finds\n  - type: follows\n"
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert f"{path}:5: cameras.door.plugins.follows.branch: `branch` cannot be overridden per camera" in str(info.value)
    config = load_config(write(tmp_path, TWO_CAMERAS + "plugins:\n  - type: finds\n  - type: follows\n    branch: true\n"))
    assert [spec.placement for spec in config.chain] == ["chain", "thread"]


def test_valid_chains_pass(tmp_path, requiring):
    """In order; a plugin disabled for a camera with what needs it; a plugin whose needs its mode waives; a disabled
    camera that would not pass."""
    path = write(
        tmp_path,
        f"cameras:\n  door:\n    source: {VTEST}\n"
        f"  yard:\n    source: {VTEST}\n    plugins:\n      follows: {{enabled: false}}\n      watches: {{enabled: false}}\n"
        f"  gate:\n    source: {VTEST}\n    plugins:\n      follows: {{enabled: false}}\n      watches: {{mode: frame}}\n"
        f"  shed:\n    source: {VTEST}\n    enabled: false\n    plugins:\n      finds: {{enabled: false}}\n"
        "plugins:\n  - type: finds\n  - type: follows\n  - type: watches\n",
    )
    config = load_config(path, environ={})
    assert {spec.id: sorted(spec.per_camera) for spec in config.chain} == {
        "finds": ["door", "gate", "yard"],
        "follows": ["door"],
        "watches": ["door", "gate"],
    }


def test_a_per_camera_config_decides_the_need(tmp_path, requiring):
    """`mode: frame` in the plugin's entry waives the need; a camera's `mode: tracks` override brings it back there."""
    path = write(
        tmp_path,
        f"cameras:\n  door:\n    source: {VTEST}\n  yard:\n    source: {VTEST}\n"
        "    plugins:\n      watches:\n        mode: tracks\n"
        "plugins:\n  - type: finds\n  - type: watches\n    mode: frame\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:11: plugins.1: watches on camera yard needs tracks,"), str(info.value)


def test_a_control_clients_camera_that_disables_the_tracker_is_refused_and_changes_nothing(tmp_path, requiring):
    path = write(tmp_path, TWO_CAMERAS + "plugins:\n  - type: finds\n  - type: follows\n  - type: watches\n")
    config = load_config(path, environ={})
    with pytest.raises(ConfigError) as info:
        with_camera(config, "gate", {"source": "test://", "plugins": {"follows": {"enabled": False}}})
    assert "cameras.gate.plugins.follows.enabled: watches (plugins.2) needs tracks on camera gate" in str(info.value)
    assert sorted(config.settings.cameras) == ["door", "yard"]
    both_off = {"source": "test://", "plugins": {"follows": {"enabled": False}, "watches": {"enabled": False}}}
    assert sorted(with_camera(config, "gate", both_off).chain[1].per_camera) == ["door", "yard"]


def check(config: Path, site: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = daemon_env(PYTHONPATH=str(site)) if site is not None else daemon_env()
    return subprocess.run(
        [sys.executable, "-m", "vigild", "check", "--config", str(config)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )


def test_vigild_check_exits_2_naming_the_camera(tmp_path):
    site = requiring_site(tmp_path)
    path = write(tmp_path, TWO_CAMERAS + "plugins:\n  - type: watches\n")
    result = check(path, site)
    assert result.returncode == 2, result.stderr
    assert f"vigild: config error: {path}:7: plugins.0: watches on cameras door, yard needs tracks" in result.stderr


DETECTOR = "  - type: detector\n    weights: yolov8n.pt\n"


@pytest.mark.parametrize(
    ("plugins", "overrides", "expected"),
    [
        (DETECTOR + "  - type: action_recognizer\n", "", ":7: plugins.1: action_recognizer on camera door needs tracks"),
        (DETECTOR + "  - type: action_recognizer\n    mode: frame\n", "", None),
        (DETECTOR + "  - type: bytetrack\n  - type: action_recognizer\n", "", None),
        ("  - type: bytetrack\n", "", ":5: plugins.0: bytetrack on camera door needs detections"),
        ("  - type: semantic_segmenter\n  - type: bytetrack\n", "", ":6: plugins.1: bytetrack on camera door needs detections"),
        (
            DETECTOR + "  - type: botsort\n  - type: analytics\n",
            "    plugins:\n      botsort: {enabled: false}\n",
            ":5: cameras.door.plugins.botsort.enabled: analytics (plugins.2) needs tracks on camera door",
        ),
    ],
    ids=["no-tracker", "frame-mode", "tracker", "no-detector", "segmenter-is-no-detector", "tracker-off-here"],
)
def test_the_built_in_plugins_declare_their_needs(tmp_path, plugins, overrides, expected):
    """The real plugins' declarations: detector and semantic_segmenter provide detections and segmentation, the
    trackers turn detections into tracks, analytics needs tracks, the action recognizer needs them in `mode: tracks`."""
    path = write(tmp_path, f"cameras:\n  door:\n    source: {VTEST}\n{overrides}plugins:\n{plugins}")
    if expected is None:
        load_config(path, environ={})
        return
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert f"{path}{expected}" in str(info.value), str(info.value)


@pytest.mark.e2e
def test_a_camera_add_through_the_control_socket_that_would_disable_the_tracker_is_refused(tmp_path, monkeypatch):
    """A running daemon answers `invalid_config` naming the camera and the override, and keeps its cameras."""
    from service import Service, camera_yaml, service_config
    from test_control_security import TEST_SOURCE, control, streaming

    monkeypatch.setattr(service_module, "plugin_site", requiring_site)
    plugins = "  - type: finds\n  - type: follows\n  - type: watches\n"
    config = service_config(tmp_path, camera_yaml("a", VTEST, loop=True), free_endpoint(), plugins=plugins)
    service = Service(tmp_path, config)
    try:
        streaming(service, "a")
        camera = {"source": TEST_SOURCE, "plugins": {"follows": {"enabled": False}}}
        reply = control(service.control_endpoint, "cameras", action="add", camera="b", config=camera)
        assert not reply["ok"] and reply["error"]["code"] == "invalid_config", reply
        message = reply["error"]["message"]
        assert "cameras.b.plugins.follows.enabled: watches (plugins.2) needs tracks on camera b" in message, message
        status = control(service.control_endpoint, "status")["result"]
        assert sorted(status["cameras"]) == ["a"] and status["cameras"]["a"]["state"] == "streaming", status
        code, _ = service.stop()
        assert code == 0
    finally:
        service.kill()


def test_one_placement_knob_with_branch_as_its_older_spelling(tmp_path, requiring):
    """`placement:` chooses where a plugin runs; `branch:` keeps working and means the same; a plugin's default is
    its own; a placement the plugin does not offer, or two keys that disagree, is an error at its line."""
    spellings = [("branch: true", "thread"), ("branch: thread", "thread"), ("branch: process", "process"),
                 ("branch: false", "chain"), ("placement: thread", "thread"), ("placement: process", "process"),
                 ("placement: chain", "chain"), ("placement: process\n    branch: process", "process")]  # fmt: skip
    for line, placement in spellings:
        path = write(tmp_path, TWO_CAMERAS + f"plugins:\n  - type: finds\n  - type: follows\n    {line}\n")
        follows = load_config(path, environ={}).chain[1]
        assert (follows.placement, follows.beside) == (placement, placement != "chain"), line
    assert load_config(write(tmp_path, TWO_CAMERAS + "plugins:\n  - type: finds\n"), environ={}).chain[0].placement == "chain"
    for line, key, wanted in [("branch: sideways", "branch", "'thread' or 'process'"),
                              ("placement: sideways", "placement", "'chain', 'thread' or 'process'"),
                              ("placement: chain\n    branch: true", "", "say different things")]:  # fmt: skip
        path = write(tmp_path, TWO_CAMERAS + f"plugins:\n  - type: finds\n  - type: follows\n    {line}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path, environ={})
        assert f"{path}:" in str(info.value) and f"plugins.1{'.' + key if key else ''}" in str(info.value), line
        assert wanted in str(info.value), (line, str(info.value))
    path = write(tmp_path, TWO_CAMERAS + "plugins:\n  - type: finds\n    placement: process\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:8: plugins.0.placement: plugin type 'finds' cannot run beside the chain")
    # the action recognizer places its classification: beside on a thread by default, in a process, or in the chain
    for line, placement in [("", "thread"), ("    placement: process\n", "process"), ("    branch: false\n", "chain")]:
        text = TWO_CAMERAS + "plugins:\n  - type: action_recognizer\n    mode: frame\n" + line
        assert load_config(write(tmp_path, text), environ={}).chain[0].placement == placement, line


