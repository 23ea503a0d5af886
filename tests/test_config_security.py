"""What a control client may set, and what no config value can do (issue 15): a control client chooses cameras and
tunes settings but never names a file the daemon loads or reads; values are finite and bounded; no config error
shows a secret or a file's content."""

from __future__ import annotations

import json
import pickle
import textwrap
import time
from pathlib import Path
from typing import ClassVar, Literal

import cv2
import numpy as np
import pytest
from conftest import MODELS, VTEST, yolo_fastest_yaml
from service import Service, camera_yaml, free_endpoint, service_config

from vigild.config.loading import Config, ControlRefused, load_config, with_camera
from vigild.config.yamlsource import ConfigError
from vigild.plugin import PluginConfig, PluginConfigError, PluginContext
from vigild.plugins.actions.action_recognizer import ActionRecognizerConfig
from vigild.plugins.detection.darknet import MAX_NAMES_BYTES, read_names
from vigild.plugins.detection.detector import Detector, DetectorConfig
from vigild.plugins.segmentation.semantic_segmenter import SemanticSegmenterConfig
from vigild.service.control import ControlClient

FASTEST = MODELS / "yolo-fastest-1.1"
XL_WEIGHTS = FASTEST / "yolo-fastest-1.1-xl.weights"
OTHER_WEIGHTS = FASTEST / "yolo-fastest-1.1.weights"  # a real file the config does not name
PASSWD_LIKE = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


class _OpensWhenUnpickled:
    """Unpickling this calls open(path, "w"): a crafted 'model' whose loading leaves a marker file behind."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.marker, "w")


def crafted_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(_OpensWhenUnpickled(marker)))
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vigild.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def admin_config(tmp_path: Path, camera_plugins: str = "") -> Config:
    """A darknet detector; camera `door` reads a local file (as only an administrator may write)."""
    return load_config(
        write(tmp_path, f"cameras:\n  door:\n    source: {VTEST}\n{camera_plugins}plugins:\n{yolo_fastest_yaml()}\n"),
        environ={},
    )


def refused(config: Config, name: str, camera: dict) -> ControlRefused:
    before = json.dumps(config.document.data, sort_keys=True, default=str)
    with pytest.raises(ControlRefused) as raised:
        with_camera(config, name, camera)
    assert raised.value.forbidden is True and isinstance(raised.value, ConfigError)
    assert json.dumps(config.document.data, sort_keys=True, default=str) == before  # nothing changed
    return raised.value


# ----- files only an administrator names


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("weights", str(OTHER_WEIGHTS)),
        ("names", "/etc/passwd"),
        ("cfg", str(FASTEST / "yolo-fastest-1.1.cfg")),
        ("backend", "ultralytics"),
    ],
)
def test_a_control_client_cannot_set_what_the_detector_loads(tmp_path, key, value):
    config = admin_config(tmp_path)
    camera = {"source": "rtsp://10.0.0.9/stream", "plugins": {"detector": {key: value, "confidence": 0.5}}}
    error = refused(config, "new", camera)
    message = str(error)
    assert f"cameras.new.plugins.detector.{key}:" in message and "only in the config file" in message, message
    assert value not in message and "root:" not in message


def test_the_refusal_does_not_tell_whether_a_path_exists(tmp_path):
    config = admin_config(tmp_path)
    messages = {
        str(refused(config, "new", {"source": "rtsp://h/s", "plugins": {"detector": {"weights": path}}}))
        for path in (str(OTHER_WEIGHTS), str(tmp_path / "no-such-file.weights"))
    }
    assert len(messages) == 1, messages


def test_every_refused_key_is_named_at_once_and_tuning_stays_allowed(tmp_path):
    config = admin_config(tmp_path)
    camera = {
        "source": "file:///srv/private.png",
        "plugins": {"detector": {"weights": str(OTHER_WEIGHTS), "names": "/etc/passwd"}},
    }
    problems = {problem.dotted() for problem in refused(config, "new", camera).problems}
    assert problems == {"cameras.new.source", "cameras.new.plugins.detector.names", "cameras.new.plugins.detector.weights"}
    tuned = with_camera(
        config, "new", {"source": "rtsp://10.0.0.9/stream", "plugins": {"detector": {"confidence": 0.6, "classes": [0]}}}
    )
    assert tuned.chain[0].per_camera["new"].confidence == 0.6


@pytest.mark.parametrize(
    "source",
    [str(VTEST), f"file://{VTEST}", "relative/video.mp4", "~/video.mp4", "file:///etc/passwd", f"  {VTEST}"],
)
def test_a_control_client_cannot_add_a_local_file_source(tmp_path, source):
    config = admin_config(tmp_path)
    message = str(refused(config, "new", {"source": source}))
    assert "cameras.new.source:" in message and "only in the config file" in message, message
    # nor point an existing camera at another file
    assert "cameras.door.source:" in str(refused(config, "door", {"source": f"file://{tmp_path}/other.avi"}))


@pytest.mark.parametrize(
    "source", ["rtsp://10.0.0.9/stream", "rtsps://cam.example/s", "http://10.0.0.9/mjpg", "https://h/x.m3u8", "/dev/video0", "0", "test://balls"]
)
def test_network_device_and_test_sources_stay_allowed(tmp_path, source):
    config = with_camera(admin_config(tmp_path), "new", {"source": source})
    assert config.settings.cameras["new"].source == source


def test_cameras_update_round_trips_what_the_administrator_wrote(tmp_path):
    written = f"    plugins:\n      detector:\n        weights: {OTHER_WEIGHTS}\n        names: {FASTEST}/coco.names\n"
    config = admin_config(tmp_path, written)
    same = {
        "source": str(VTEST),
        "fps": 5,
        "plugins": {"detector": {"weights": str(OTHER_WEIGHTS), "names": f"{FASTEST}/coco.names", "confidence": 0.4}},
    }
    updated = with_camera(config, "door", same)
    assert updated.settings.cameras["door"].fps == 5 and updated.chain[0].per_camera["door"].confidence == 0.4
    # a different file for the same key, or the same file on another camera, is a new file: refused
    other = {**same, "plugins": {"detector": {"weights": str(XL_WEIGHTS), "names": f"{FASTEST}/coco.names"}}}
    assert [p.dotted() for p in refused(config, "door", other).problems] == ["cameras.door.plugins.detector.weights"]
    assert {p.dotted() for p in refused(config, "twin", same).problems} == {
        "cameras.twin.source",
        "cameras.twin.plugins.detector.weights",
        "cameras.twin.plugins.detector.names",
    }


def test_values_a_control_client_sends_are_not_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/somebody")
    monkeypatch.setenv("CAM_USER", "admin")
    config = with_camera(
        admin_config(tmp_path), "new", {"source": "rtsp://10.0.0.9/${HOME}", "username": "${CAM_USER}${HOME}"}
    )
    camera = config.settings.cameras["new"]
    assert camera.username == "${CAM_USER}${HOME}" and camera.source == "rtsp://10.0.0.9/${HOME}"


def test_plugins_declare_what_only_the_config_file_may_set():
    assert {"weights", "cfg", "names", "backend"} <= DetectorConfig.admin_only_keys()
    assert {"model", "weights"} <= SemanticSegmenterConfig.admin_only_keys()
    assert {"model", "weights", "labels"} <= ActionRecognizerConfig.admin_only_keys()

    class ThirdParty(PluginConfig):  # as a plugin author writes it (docs/plugins.md)
        admin_only: ClassVar[frozenset[str]] = frozenset({"engine"})
        type: Literal["third_party"] = "third_party"
        engine: str = "onnx"
        lookup: Path | None = None  # any path-typed field counts without being listed
        gain: float = 1.0

    class Derived(ThirdParty):
        admin_only: ClassVar[frozenset[str]] = frozenset({"cache"})
        cache: str = ""

    assert ThirdParty.admin_only_keys() == {"engine", "lookup"}
    assert Derived.admin_only_keys() == {"engine", "lookup", "cache"}  # a subclass cannot drop its base's keys


def control(endpoint: str, command: str, **arguments: object) -> dict:
    with ControlClient(endpoint, timeout=60) as client:
        reply, _ = client.request(command, **arguments)
    return reply


def test_through_the_control_socket_a_crafted_model_is_never_loaded_and_no_file_is_read(tmp_path):
    """A real daemon with a detector: a control client's camera naming a pickle as its weights, /etc/passwd as its
    names, or a local image as its source is refused with `forbidden`; the pickle is never unpickled (its marker file
    never appears), no line of the names file comes back, no camera is added."""
    marker = tmp_path / "unpickled-marker"
    evil = crafted_pickle(tmp_path / "evil.pt", marker)
    image = tmp_path / "private.png"
    cv2.imwrite(str(image), np.full((48, 64, 3), 200, np.uint8))
    cameras = camera_yaml("a", "test://balls?width=160&height=120&fps=5")
    plugins = yolo_fastest_yaml() + "\n"
    config = service_config(tmp_path, cameras, free_endpoint(), plugins=plugins)
    service = Service(tmp_path, config)
    try:
        deadline = time.monotonic() + 120
        while True:  # started once camera a streams (the control socket answers before the daemon has started)
            status = control(service.control_endpoint, "status")
            assert status["ok"] and list(status["result"]["cameras"]) == ["a"], status
            if status["result"]["cameras"]["a"]["state"] == "streaming":
                break
            assert service.process.poll() is None and time.monotonic() < deadline, service.log_text()
            time.sleep(0.2)

        attempts = {
            "weights": {"backend": "ultralytics", "weights": str(evil)},
            "names": {"names": "/etc/passwd", "classes": ["no-such-class"]},
        }
        for key, override in attempts.items():
            camera = {"source": "test://smpte?width=64&height=48&fps=5", "plugins": {"detector": override}}
            reply = control(service.control_endpoint, "cameras", action="add", camera="b", config=camera)
            assert not marker.exists(), "the crafted weights were unpickled"
            assert not reply["ok"] and reply["error"]["code"] == "forbidden", reply
            assert f"cameras.b.plugins.detector.{key}" in reply["error"]["message"], reply
            assert "root:" not in json.dumps(reply) and "nologin" not in json.dumps(reply), reply
        reply = control(service.control_endpoint, "cameras", action="add", camera="b", config={"source": image.as_uri()})
        assert not reply["ok"] and reply["error"]["code"] == "forbidden", reply
        assert "cameras.b.source" in reply["error"]["message"], reply
        reply = control(service.control_endpoint, "cameras", action="update", camera="a", config={"source": str(image)})
        assert not reply["ok"] and reply["error"]["code"] == "forbidden", reply

        status = control(service.control_endpoint, "status")["result"]
        assert list(status["cameras"]) == ["a"], status
        assert control(service.control_endpoint, "snapshot", camera="b")["error"]["code"] == "unknown_camera"
        # a camera a control client may add still goes in, with its tuning
        reply = control(
            service.control_endpoint,
            "cameras",
            action="add",
            camera="c",
            config={"source": "test://smpte?width=64&height=48&fps=5", "plugins": {"detector": {"confidence": 0.5}}},
        )
        assert reply["ok"] and reply["result"]["cameras"]["added"] == ["c"], reply
        code, _ = service.stop()
        assert code == 0, service.log_text()
    finally:
        service.kill()
    assert not marker.exists()
    assert "root:" not in service.log_text()


# ----- no file content in errors


def test_an_unknown_class_does_not_show_the_names_file(tmp_path):
    names = tmp_path / "secret.names"
    names.write_text(PASSWD_LIKE + "".join(f"filler{i}\n" for i in range(78)))  # 80 lines, as the model's classes
    config = DetectorConfig(
        backend="darknet", cfg=FASTEST / "yolo-fastest-1.1.cfg", weights=str(OTHER_WEIGHTS), names=names,
        classes=["person"],
    )  # fmt: skip
    with pytest.raises(PluginConfigError) as raised:
        Detector(config, PluginContext("cpu", {})).start()
    message = str(raised.value)
    assert raised.value.key == "classes" and str(names) in message and "has 80 names" in message, message
    assert "root:x" not in message and "nologin" not in message, message


def test_a_names_file_of_another_length_than_the_models_classes_is_refused_unread(tmp_path):
    """The darknet port checks the names against its cfg's classes (80): a file of 2 lines is named, not echoed."""
    names = tmp_path / "secret.names"
    names.write_text(PASSWD_LIKE)
    config = DetectorConfig(
        backend="darknet", cfg=FASTEST / "yolo-fastest-1.1.cfg", weights=str(OTHER_WEIGHTS), names=names,
        runtime="torch",
    )  # fmt: skip
    with pytest.raises(PluginConfigError) as raised:
        Detector(config, PluginContext("cpu", {})).start()
    message = str(raised.value)
    assert raised.value.key == "names" and f"{names} has 2 names; the cfg's [yolo] layers have 80" in message
    assert "root:x" not in message and "nologin" not in message, message


def _read_labels(path: Path) -> tuple[str, ...]:
    from vigild.plugins.actions.video_models import read_labels

    return read_labels(path)


@pytest.mark.parametrize(("read", "key"), [(read_names, "names"), (_read_labels, "labels")], ids=["names", "labels"])
def test_a_names_or_labels_file_that_is_not_one_is_a_clear_error(tmp_path, read, key):
    """The detector's names and the action recognizer's labels: bounded, text only, named but never echoed."""
    from vigild.plugins.actions.video_models import VideoModelError

    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x80\x81\xferoot:x:0:0\n" * 10)
    huge = tmp_path / "huge.txt"
    huge.write_text("person\n" * (MAX_NAMES_BYTES // 7 + 1))
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"person\n\0car\n")
    for path, fragment in ((binary, "not UTF-8 text"), (huge, "larger than"), (nul, "NUL")):
        with pytest.raises((PluginConfigError, VideoModelError)) as raised:
            read(path)
        message = str(raised.value)
        assert raised.value.key == key and str(path) in message and fragment in message, message
        assert "root:x" not in message and "person" not in message, message
    good = tmp_path / "good.txt"
    good.write_text("person\n\n bicycle \n")
    assert read(good) == ("person", "bicycle")
    assert read_names(FASTEST / "coco.names")[:2] == ("person", "bicycle")


def test_an_unknown_action_does_not_show_the_labels_file(tmp_path):
    from vigild.plugins.actions.action_recognizer import ActionRecognizer

    labels = tmp_path / "labels.txt"
    labels.write_text("root:x:0:0\ndaemon:x:1:1\nstroll\n")
    config = ActionRecognizerConfig(model="r3d_18", weights=None, labels=labels, actions=["moonwalk"], clip_len=4, size=32)
    with pytest.raises(PluginConfigError) as raised:
        ActionRecognizer(config, PluginContext("cpu", {})).start()
    message = str(raised.value)
    assert raised.value.key == "actions" and "'moonwalk'" in message and str(labels) in message, message
    assert "root:x" not in message and "stroll" not in message and "daemon:x" not in message, message


# ----- bounded values


def settings_error(tmp_path: Path, extra: str, camera: str = "", plugins: str = "") -> str:
    # zones and lines are the analytics plugin's settings: it checks them when it is in the chain
    analytics = "  - type: analytics\n" if "zones:" in camera or "lines:" in camera else ""
    text = f"cameras:\n  door:\n    source: test://balls\n{camera}plugins:\n  - type: bytetrack\n{plugins}{analytics}{extra}"
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text), environ={})
    return str(raised.value)


@pytest.mark.parametrize(
    ("extra", "camera", "plugins", "expected"),
    [
        ("publisher:\n  heartbeat_interval: .inf\n", "", "", ":7: publisher.heartbeat_interval: Input should be a finite number"),
        ("publisher:\n  heartbeat_interval: .nan\n", "", "", ":7: publisher.heartbeat_interval: Input should be a finite number"),
        ("publisher:\n  heartbeat_interval: 1e12\n", "", "", ":7: publisher.heartbeat_interval: Input should be less than or equal to 3600"),
        ("control:\n  timeout: .inf\n", "", "", ":7: control.timeout: Input should be a finite number"),
        ("scheduler:\n  max_wait_ms: .inf\n", "", "", ":7: scheduler.max_wait_ms: Input should be a finite number"),
        ("", "    stall_timeout: .inf\n", "", ":4: cameras.door.stall_timeout: Input should be a finite number"),
        ("", "    reconnect:\n      max_delay: 1e300\n", "", ":5: cameras.door.reconnect.max_delay: Input should be less"),
        ("", "    fps: 1e-300\n", "", ":4: cameras.door.fps: at least 0.001"),
        ("", "    resize: [8193, 100]\n", "", ":4: cameras.door.resize.0: Input should be less than or equal to 8192"),
        ("", "    zones:\n      z:\n        points: [[0, 0], [.inf, 0], [0, 5]]\n", "", ":6: cameras.door.zones.z.points.1.0: Input should be a finite number"),
        ("", "    lines:\n      " + "l" * 65 + ":\n        points: [[0, 0], [5, 5]]\n", "", f":5: cameras.door.lines.{'l' * 65}: String should have at most 64 characters"),
        ("", "", "    update_interval: .inf\n", ":6: plugins.0.update_interval: Input should be a finite number"),
        ("", "", "    id: " + "t" * 65 + "\n", ":6: plugins.0.id: String should have at most 64 characters"),
        ("publisher:\n  hwm: 100000000\n", "", "", ":7: publisher.hwm: Input should be less than or equal to 1000000"),
        ("publisher:\n  queue_size: 100000000\n", "", "", ":7: publisher.queue_size: Input should be less than or equal to 1000000"),
        ("publisher:\n  linger_ms: 100000000\n", "", "", ":7: publisher.linger_ms: Input should be less than or equal to 60000"),
        ("scheduler:\n  max_batch: 100000\n", "", "", ":7: scheduler.max_batch: Input should be less than or equal to 1024"),
        ("torch_threads: 100000\n", "", "", ":6: torch_threads: Input should be less than or equal to 1024"),
    ],
    ids=["inf-heartbeat", "nan-heartbeat", "huge-heartbeat", "inf-control-timeout", "inf-batch-wait", "inf-stall",
         "huge-backoff", "tiny-fps", "huge-resize", "inf-zone-point", "long-line-name", "inf-plugin-float",
         "long-plugin-id", "huge-hwm", "huge-queue", "huge-linger", "huge-batch", "huge-threads"],
)  # fmt: skip
def test_durations_sizes_and_names_are_bounded(tmp_path, extra, camera, plugins, expected):
    message = settings_error(tmp_path, extra, camera, plugins)
    assert expected in message, message


def test_a_control_client_adds_cameras_only_up_to_control_max_cameras(tmp_path):
    path = write(tmp_path, "cameras:\n  a:\n    source: test://balls\n  b:\n    source: test://balls\ncontrol:\n  max_cameras: 3\n")
    config = with_camera(load_config(path, environ={}), "c", {"source": "test://snow"})
    assert sorted(config.cameras) == ["a", "b", "c"]
    error = refused(config, "d", {"source": "test://snow"})
    assert "control.max_cameras: 3" in str(error) and "cameras.d" in str(error), error
    assert sorted(with_camera(config, "c", {"source": "test://balls"}).cameras) == ["a", "b", "c"]  # update: fine
    assert sorted(with_camera(with_camera(config, "a", None), "d", {"source": "test://snow"}).cameras) == ["b", "c", "d"]


def test_the_largest_allowed_values_load(tmp_path):
    name = "c" * 64
    text = (
        f"cameras:\n  {name}:\n    source: test://balls\n    resize: [8192, 4320]\n    fps: 0.001\n"
        "plugins:\n  - type: detector\n    weights: yolov8n.pt\n  - type: bytetrack\n    id: " + "t" * 64
        + "\npublisher:\n  heartbeat_interval: 3600\n"
    )
    config = load_config(write(tmp_path, text), environ={})
    assert config.settings.cameras[name].resize == (8192, 4320)


def test_a_camera_name_is_at_most_64_characters_and_a_long_one_is_not_echoed(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, f"cameras:\n  {'x' * 65}:\n    source: test://balls\n"), environ={})
    assert f":2: cameras.{'x' * 65}: String should have at most 64 characters" in str(raised.value), raised.value
    config = load_config(write(tmp_path, "cameras:\n  a:\n    source: test://balls\n"), environ={})
    with pytest.raises(ConfigError) as raised:  # as `cameras add` sends it: 70,000 characters
        with_camera(config, "y" * 70_000, {"source": "test://balls"})
    message = str(raised.value)
    assert "String should have at most 64 characters" in message and "y" * 100 not in message, message[:300]


# ----- no secrets in config errors


@pytest.mark.parametrize(("key", "value"), [("password", "90817263"), ("password", "3.14159"), ("username", "75319")])
def test_an_invalid_credential_is_never_shown(tmp_path, key, value):
    text = f"cameras:\n  door:\n    source: rtsp://10.0.0.5/stream\n    {key}: {value}\n"
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text), environ={})
    message = str(raised.value)
    assert f":4: cameras.door.{key}: Input should be a valid string" in message, message
    assert value not in message, message
