"""The darknet port (vigild.plugins.detection.darknet_torch) against OpenCV DNN, the runtime these weights were
validated with: the same blob in, the same rows out (ground truth: OpenCV's forward, not the port's own output)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import VTEST, YOLO_FASTEST

from vigild.config.settings import CameraConfig
from vigild.frame import Detections
from vigild.plugin import PluginContext
from vigild.plugins.detection.darknet import with_score_floor
from vigild.plugins.detection.darknet_torch import DarknetCfgError, DarknetModel, load_darknet
from vigild.plugins.detection.detector import Detector, DetectorConfig

CONFIDENCE = 0.1


def vtest_frames(count: int, step: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(VTEST))
    frames = []
    index = 0
    while len(frames) < count:
        ok, frame = capture.read()
        assert ok
        if index % step == 0:
            frames.append(frame)
        index += 1
    return frames


def opencv_rows(cfg: Path, weights: Path, blob: np.ndarray) -> np.ndarray:
    net = cv2.dnn.readNetFromDarknet(
        np.frombuffer(with_score_floor(cfg.read_text(), CONFIDENCE).encode(), np.uint8), np.fromfile(weights, np.uint8)
    )
    net.setInput(blob)
    outputs = net.forward(net.getUnconnectedOutLayersNames())
    return np.concatenate([out.reshape(len(blob), -1, out.shape[-1]) for out in outputs], axis=1)


@pytest.mark.parametrize("name", ["yolo-fastest-1.1-xl", "yolo-fastest-1.1"])
def test_the_port_gives_opencv_dnns_boxes_classes_and_scores_on_vtest_frames(name):
    cfg, weights = YOLO_FASTEST / f"{name}.cfg", YOLO_FASTEST / f"{name}.weights"
    model = load_darknet(cfg, weights, thresh=CONFIDENCE)
    frames = vtest_frames(6, 40)
    blob = cv2.dnn.blobFromImages(frames, 1 / 255.0, model.net_size, swapRB=True, crop=False)
    expected = opencv_rows(cfg, weights, blob)
    with torch.no_grad():
        got = model(torch.from_numpy(blob)).numpy()
    assert got.shape == expected.shape
    height, width = frames[0].shape[:2]
    assert np.abs(got[..., :4] - expected[..., :4]).max() * max(width, height) < 1.0  # boxes within 1 px
    assert np.abs(got[..., 4:] - expected[..., 4:]).max() < 1e-3  # objectness and scores
    detected = expected[..., 5:].max(-1) >= 0.3
    assert detected.sum() >= 20, "the frames hold people to find"
    assert (got[..., 5:].argmax(-1)[detected] == expected[..., 5:].argmax(-1)[detected]).all()  # same classes


def test_a_batch_gives_what_each_frame_gives_alone():
    model = load_darknet(YOLO_FASTEST / "yolo-fastest-1.1-xl.cfg", YOLO_FASTEST / "yolo-fastest-1.1-xl.weights")
    frames = vtest_frames(4, 50)
    blob = torch.from_numpy(cv2.dnn.blobFromImages(frames, 1 / 255.0, model.net_size, swapRB=True, crop=False))
    with torch.no_grad():
        together = model(blob)
        alone = torch.cat([model(blob[i : i + 1]) for i in range(len(frames))])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)


def test_files_the_port_cannot_take_are_refused_naming_what(tmp_path):
    cfg = (YOLO_FASTEST / "yolo-fastest-1.1.cfg").read_text()
    short = tmp_path / "short.weights"
    short.write_bytes((YOLO_FASTEST / "yolo-fastest-1.1.weights").read_bytes()[:-400])
    with pytest.raises(DarknetCfgError, match=r"short.weights: holds \d+ weights, the cfg needs \d+"):
        DarknetModel(cfg).load_weights(short)
    with pytest.raises(DarknetCfgError, match=r"\[reorg\] at line 3: this layer type is not supported"):
        DarknetModel("[net]\nwidth=64\n[reorg]\nstride=2\n")
    with pytest.raises(DarknetCfgError, match="starts with a \\[net\\] section"):
        DarknetModel("[convolutional]\nfilters=1\n")
    with pytest.raises(DarknetCfgError, match=r"\[convolutional\] at line 2: activation 'mish' is not supported"):
        DarknetModel("[net]\n[convolutional]\nfilters=4\nactivation=mish\n")
    with pytest.raises(DarknetCfgError, match=r"line 4: `filters=eight` in \[convolutional\]: expected integers"):
        DarknetModel("[net]\nwidth=64\n[convolutional]\nfilters=eight\n")
    with pytest.raises(DarknetCfgError, match=r"tiny.weights: 8 bytes is too short for a darknet weights file"):
        (tmp_path / "tiny.weights").write_bytes(b"\0" * 8)
        DarknetModel(cfg).load_weights(tmp_path / "tiny.weights")


def detector(runtime: str, **overrides: object) -> Detector:
    config = DetectorConfig(
        cfg=YOLO_FASTEST / "yolo-fastest-1.1-xl.cfg",
        weights=str(YOLO_FASTEST / "yolo-fastest-1.1-xl.weights"),
        names=YOLO_FASTEST / "coco.names",
        confidence=0.25,
        **({"runtime": runtime} if runtime else {}),
        **overrides,
    )
    plugin = Detector(config, PluginContext("cpu", {"vtest": CameraConfig(source=str(VTEST))}, torch_threads=2))
    plugin.start()
    return plugin


def sorted_rows(found: Detections) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.lexsort((found.xyxy[:, 1], found.xyxy[:, 0], found.class_id))
    return found.xyxy[order], found.confidence[order], found.class_id[order]


@pytest.mark.parametrize("input_size", [None, (416, 320)])
def test_the_detector_on_the_port_finds_what_opencv_dnn_finds_in_vtest_frames(input_size):
    """The torch runtime (the port on the device pipeline, frames stretched as in training, one NMS a
    batch) against `runtime: opencv` (OpenCV DNN's own pre-processing, network and decoding): boxes within 1 px in
    the frame, the same classes, scores within 1e-3; at the cfg's size and at a size of the user's (both stretch the
    768x576 frames unevenly: a scale per axis)."""
    size = {"input_size": input_size} if input_size else {}
    port, opencv = detector("torch", **size), detector("opencv", **size)
    frames = vtest_frames(24, 30)
    assert type(port.backend).__name__ == "YoloBackend" and type(opencv.backend).__name__ == "DarknetBackend"
    total = 0
    for start in range(0, len(frames), 8):
        batch = frames[start : start + 8]
        for got, expected in zip(port.backend.detect(batch), opencv.backend.detect(batch), strict=True):
            assert len(got) == len(expected)
            got_xyxy, got_conf, got_cls = sorted_rows(got)
            exp_xyxy, exp_conf, exp_cls = sorted_rows(expected)
            assert (got_cls == exp_cls).all()
            assert np.abs(got_xyxy - exp_xyxy).max(initial=0) < 1.0
            assert np.abs(got_conf - exp_conf).max(initial=0) < 1e-3
            total += len(got)
    assert total >= 24 * 3, "the frames hold people (and a car or two) to find"


def test_the_port_detects_a_batch_as_it_detects_each_frame_alone():
    plugin = detector("torch")
    frames = vtest_frames(6, 45)
    together = plugin.backend.detect(frames)
    for frame, batched in zip(frames, together, strict=True):
        alone = plugin.backend.detect([frame])[0]
        np.testing.assert_allclose(batched.xyxy, alone.xyxy, atol=1e-2)
        np.testing.assert_allclose(batched.confidence, alone.confidence, atol=1e-4)
        np.testing.assert_array_equal(batched.class_id, alone.class_id)
