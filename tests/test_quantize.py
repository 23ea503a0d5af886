"""`vigild quantize` as a user runs it: INT8 calibrated on a camera's frames (vtest), its agreement with fp32 on
frames it held back, the result taken by the detector like any ONNX model, and a clear error for each wrong input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, VTEST, YOLO_FASTEST, daemon_env, write_video

from vigild.cli import main
from vigild.config.settings import CameraConfig
from vigild.plugin import PluginContext
from vigild.plugins.detection.detector import Detector, DetectorConfig

DETECTOR = f"""\
  - type: detector
    id: {{id}}
    cfg: {YOLO_FASTEST}/yolo-fastest-1.1-xl.cfg
    weights: {YOLO_FASTEST}/yolo-fastest-1.1-xl.weights
    names: {YOLO_FASTEST}/coco.names
"""


def config_file(directory: Path, source: Path = VTEST, detectors: tuple[str, ...] = ("people",)) -> Path:
    path = directory / "vigild.yaml"
    plugins = "".join(DETECTOR.format(id=name) for name in detectors) if detectors else "  []\n"
    path.write_text(f"cameras:\n  door:\n    source: {source}\nplugins:\n{plugins}")
    return path


@pytest.mark.timeout(900)
def test_quantize_on_vtest_agrees_with_fp32_on_held_back_frames_and_the_detector_runs_the_result(tmp_path):
    out = tmp_path / "xl.int8.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "vigild", "quantize", "--config", str(config_file(tmp_path)), "--camera", "door",
         "--frames", "200", "--holdout", "60", "--out", str(out)],
        env=daemon_env(), cwd=ROOT, capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.stdout
    assert f"wrote {out} (INT8, QDQ, per-channel): detector 'people', calibrated on 200 frames of camera 'door'" in report
    overall = re.search(r"^  all +(\d+) +(\d+) +(\d+) +([\d.]+) +([\d.]+) +([\d.]+)$", report, re.MULTILINE)
    assert overall, report
    reference, found, matched = (int(overall[i]) for i in (1, 2, 3))
    assert reference >= 60 * 3, "the held-back frames hold people"
    f1 = 2 * matched / (reference + found)
    assert f1 >= 0.9, report
    assert re.search(r"^  person +\d+", report, re.MULTILINE)
    assert "speed on this machine" in report

    import onnx

    model = onnx.load(str(out))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ
    meta = {prop.key: prop.value for prop in model.metadata_props}
    assert meta["vigild.resize"] == "stretch" and "'person'" in meta["names"]

    plugin = Detector(DetectorConfig(weights=str(out), classes=["person"], confidence=0.3),
                      PluginContext("cpu", {"door": CameraConfig(source=str(VTEST))}, torch_threads=2))  # fmt: skip
    plugin.start()
    capture = cv2.VideoCapture(str(VTEST))
    frames = [capture.read()[1] for _ in range(40)][::5]
    counts = np.array([len(found) for found in plugin.backend.detect(frames)])
    assert counts.min() >= 1 and counts.mean() >= 3, counts


def quantize(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str]:
    code = main(["quantize", "--config", str(config), "--out", str(config.parent / "out.onnx"), *args])
    return code, capsys.readouterr().err


def test_wrong_input_gets_a_clear_error_and_exit_2(tmp_path, capsys):
    vtest = config_file(tmp_path)
    code, err = quantize(capsys, vtest, "--camera", "porch")
    assert code == 2 and f"{vtest} has no camera 'porch' (it has: door)" in err
    code, err = quantize(capsys, vtest, "--camera", "door", "--frames", "5")
    assert code == 2 and "--frames 5: calibrating needs at least 10 frames" in err
    code, err = quantize(capsys, vtest, "--camera", "door", "--plugin", "cars")
    assert code == 2 and "has no plugin 'cars' (its detectors: people)" in err

    capture = cv2.VideoCapture(str(VTEST))
    short_dir = tmp_path / "short"
    short_dir.mkdir()
    short = write_video([capture.read()[1] for _ in range(20)], short_dir / "short.avi", 10)
    code, err = quantize(capsys, config_file(short_dir, short), "--camera", "door", "--frames", "10", "--holdout", "15")
    assert code == 2 and "camera 'door' gave 20 frames before its end: 10 for calibration and 15 held back need 25" in err

    none_dir = tmp_path / "none"
    none_dir.mkdir()
    code, err = quantize(capsys, config_file(none_dir, detectors=()), "--camera", "door")
    assert code == 2 and "has no detector plugin" in err

    two_dir = tmp_path / "two"
    two_dir.mkdir()
    code, err = quantize(capsys, config_file(two_dir, detectors=("people", "cars")), "--camera", "door")
    assert code == 2 and "has several detectors (people, cars): say which with --plugin" in err

    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    garbage = bad_dir / "model.onnx"
    garbage.write_bytes(b"not a model" * 100)
    bad = bad_dir / "vigild.yaml"
    bad.write_text(f"cameras:\n  door:\n    source: {VTEST}\nplugins:\n  - type: detector\n    weights: {garbage}\n")
    code, err = quantize(capsys, bad, "--camera", "door")
    assert code == 2 and f"weights: {garbage}: not a valid ONNX model" in err
