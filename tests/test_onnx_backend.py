"""The ONNX Runtime back end of the detector, with models as users get them: `vigild export` of the darknet port
(real weights), and ultralytics' own `export(format="onnx")` (its tool, run offline here, from yolov8n.yaml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, VTEST, YOLO_FASTEST, daemon_env

from vigild.config.settings import CameraConfig
from vigild.plugin import PluginConfigError, PluginContext
from vigild.plugins.detection.detector import Detector, DetectorConfig
from vigild.plugins.detection.onnx_runtime import OrtModule, open_session
from vigild.plugins.detection.yolo import YoloBackend


def vtest_frames(count: int, step: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(VTEST))
    frames = []
    for index in range(count * step):
        ok, frame = capture.read()
        assert ok
        if index % step == 0:
            frames.append(frame)
    return frames


def start(**settings: object) -> Detector:
    plugin = Detector(DetectorConfig(**settings), PluginContext("cpu", {"vtest": CameraConfig(source=str(VTEST))}, torch_threads=2))  # type: ignore[arg-type]
    plugin.start()
    return plugin


DARKNET = {
    "cfg": YOLO_FASTEST / "yolo-fastest-1.1-xl.cfg",
    "weights": str(YOLO_FASTEST / "yolo-fastest-1.1-xl.weights"),
    "names": YOLO_FASTEST / "coco.names",
}


@pytest.fixture(scope="module")
def exported_darknet(tmp_path_factory) -> Path:
    """`vigild export` as a user runs it, on a config whose detector is the darknet model."""
    work = tmp_path_factory.mktemp("export")
    config = work / "vigild.yaml"
    config.write_text(
        f"cameras:\n  door:\n    source: {VTEST}\nplugins:\n  - type: detector\n    id: people\n"
        f"    cfg: {DARKNET['cfg']}\n    weights: {DARKNET['weights']}\n    names: {DARKNET['names']}\n"
    )
    out = work / "xl.onnx"
    done = subprocess.run([sys.executable, "-m", "vigild", "export", "--config", str(config), "--out", str(out)],
                          env=daemon_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: detector 'people' (detect, 80 classes, input 320x320, stretch" in done.stdout
    return out


def test_an_exported_darknet_model_finds_the_boxes_of_the_torch_model_it_came_from(exported_darknet):
    onnx, port = start(weights=str(exported_darknet), confidence=0.25), start(**DARKNET, runtime="torch", confidence=0.25)
    assert onnx.config.resolved_backend == "onnx" and type(onnx.backend).__name__ == "OnnxBackend"
    assert onnx.backend.class_names == port.backend.class_names  # read back from the model's metadata
    assert onnx.backend.input_size == (320, 320) and onnx.backend.resize == "stretch"
    frames = vtest_frames(16, 40)
    total = 0
    for got, expected in zip(onnx.backend.detect(frames), port.backend.detect(frames), strict=True):
        assert len(got) == len(expected)
        np.testing.assert_allclose(got.xyxy, expected.xyxy, atol=0.05)
        np.testing.assert_allclose(got.confidence, expected.confidence, atol=1e-4)
        np.testing.assert_array_equal(got.class_id, expected.class_id)
        total += len(got)
    assert total >= 16 * 3


def test_the_onnx_back_end_detects_a_batch_as_each_frame_alone(exported_darknet):
    plugin = start(weights=str(exported_darknet), classes=["person"])
    frames = vtest_frames(5, 60)
    for frame, batched in zip(frames, plugin.backend.detect(frames), strict=True):
        alone = plugin.backend.detect([frame])[0]
        np.testing.assert_allclose(batched.xyxy, alone.xyxy, atol=1e-2)
        np.testing.assert_array_equal(batched.class_id, alone.class_id)
        assert len(batched) >= 1 and set(batched.class_names[c] for c in batched.class_id) == {"person"}


@pytest.fixture(scope="module")
def ultralytics_exports(tmp_path_factory) -> dict[str, Path]:
    """ultralytics' own ONNX export of yolov8n.yaml (random weights) at 320x256: dynamic batch, and fixed batch 1."""
    work = tmp_path_factory.mktemp("ultralytics")
    script = (
        "import shutil, sys\nfrom ultralytics import YOLO\n"
        "for dynamic in (True, False):\n"
        "    out = YOLO('yolov8n.yaml').export(format='onnx', dynamic=dynamic, imgsz=(256, 320))\n"
        "    shutil.move(out, sys.argv[1] + ('/dynamic.onnx' if dynamic else '/fixed.onnx'))\n"
    )
    env = daemon_env()
    done = subprocess.run([sys.executable, "-c", script, str(work)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install" not in done.stdout + done.stderr  # its requirements are vigild's: nothing to install
    return {"dynamic": work / "dynamic.onnx", "fixed": work / "fixed.onnx"}


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_ultralytics_onnx_exports_are_read_and_run_as_the_torch_model(ultralytics_exports, kind):
    """The layout, names and input size of ultralytics' export are read from the file, and a batch of frames gives
    what each frame gives alone, with a dynamic batch axis and with a batch fixed at 1 (run a frame at a time). Its
    weights are random: the raw head output is compared, not the NMS of random scores."""
    plugin = start(weights=str(ultralytics_exports[kind]))
    backend = plugin.backend
    assert backend.input_size == (320, 256) and backend.resize == "letterbox" and len(backend.class_names) == 80
    frames = vtest_frames(3, 50)
    batch, _ = backend.letterbox(frames)
    module = backend.model
    assert isinstance(module, OrtModule) and module.batch == (None if kind == "dynamic" else 1)
    raw = module(batch)
    assert isinstance(raw, torch.Tensor) and raw.shape == (3, 84, 320 * 256 // 64 + 320 * 256 // 256 + 320 * 256 // 1024)
    alone = torch.cat([module(batch[i : i + 1]) for i in range(3)])  # type: ignore[misc]
    torch.testing.assert_close(raw, alone, rtol=1e-4, atol=1e-3)
    found = backend.detect(frames)
    assert len(found) == 3


def test_an_onnx_export_equals_the_torch_model_it_came_from(tmp_path):
    """`vigild export` of an ultralytics model (yolov8n.yaml, its weights as built): the raw head output of the ONNX
    model equals the torch model's on the same letterboxed vtest batch."""
    from vigild.plugins.detection.export import export_onnx, exportable

    config = DetectorConfig(weights="yolov8n.yaml", input_size=(320, 256))
    model = exportable(config)
    out = export_onnx(model, tmp_path / "v8.onnx")
    backend = YoloBackend(model.model, "detect", model.class_names, (320, 256), 0.25, 0.45, "cpu", False)
    batch, _ = backend.letterbox(vtest_frames(2, 80))
    with torch.no_grad():
        expected = backend.model(batch)
    got = OrtModule(open_session(out, "cpu", 2), None)(batch.contiguous())
    assert isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-2)


def test_onnx_files_the_detector_cannot_run_are_refused_naming_the_file(tmp_path, exported_darknet):
    garbage = tmp_path / "garbage.onnx"
    for content in (np.random.default_rng(seed).bytes(4096) for seed in range(8)):  # (some made ORT abort)
        garbage.write_bytes(content)
        with pytest.raises(PluginConfigError, match=r"garbage.onnx: not a valid ONNX model") as caught:
            start(weights=str(garbage))
        assert caught.value.key == "weights"
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(exported_darknet.read_bytes()[: exported_darknet.stat().st_size // 2])  # a copy that stopped
    with pytest.raises(PluginConfigError, match=r"cut.onnx: not a valid ONNX model"):
        start(weights=str(cut))
    with pytest.raises(PluginConfigError, match=r"input is fixed at \[320, 320\]; input_size \[640, 640\] differs"):
        start(weights=str(exported_darknet), input_size=640)
    with pytest.raises(ValueError, match="precision it was exported or quantized in"):
        DetectorConfig(weights=str(exported_darknet), half=True)
    with pytest.raises(ValueError, match="only for the darknet back end"):
        DetectorConfig(weights=str(exported_darknet), runtime="opencv")
