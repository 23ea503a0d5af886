"""The detector plugin on real footage with real pretrained weights (and ultralytics built from its yaml)."""

from __future__ import annotations

import logging
import time

import cv2
import numpy as np
import pytest
from conftest import VTEST, YOLO_FASTEST

from vigild.config.loading import CameraConfig
from vigild.frame import Frame
from vigild.plugin import PluginConfigError, PluginContext
from vigild.plugins.detection.darknet import dnn_placement
from vigild.plugins.detection.detector import Detector, DetectorConfig


def read_frames(count: int) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(VTEST))
    images = []
    while len(images) < count:
        ok, image = capture.read()
        assert ok, "vtest.avi ended early"
        images.append(image)
    capture.release()
    return images


def darknet(device: str = "cpu", **overrides) -> Detector:
    config = DetectorConfig(
        backend="darknet",
        cfg=YOLO_FASTEST / "yolo-fastest-1.1-xl.cfg",
        weights=str(YOLO_FASTEST / "yolo-fastest-1.1-xl.weights"),
        names=YOLO_FASTEST / "coco.names",
        **({"classes": ["person"], "confidence": 0.3, "input_size": 320} | overrides),
    )
    detector = Detector(config, PluginContext(device, {"vtest": CameraConfig(source=str(VTEST))}))
    detector.start()
    return detector


def as_frames(images: list[np.ndarray], camera: str = "vtest") -> list[Frame]:
    return [Frame(camera, i, time.time(), time.monotonic(), image) for i, image in enumerate(images)]


@pytest.fixture(scope="module")
def first_100() -> list[np.ndarray]:
    return read_frames(100)


def test_darknet_finds_people_in_every_one_of_the_first_100_frames(first_100):
    detector = darknet()
    frames = as_frames(first_100)
    for start in range(0, 100, 8):  # batches of 8, as the scheduler would send them
        detector.process(frames[start : start + 8])
    counts = np.array([len(f.detections) for f in frames])
    assert counts.min() >= 1, f"frames without a person: {np.flatnonzero(counts == 0).tolist()}"
    assert counts.mean() >= 3.0, f"mean {counts.mean():.2f} people a frame"
    for frame in frames:
        d = frame.detections
        assert set(d.class_id.tolist()) <= {0} and all(d.label(i) == "person" for i in range(len(d)))
        assert (d.confidence >= 0.3).all()
        width, height = frame.size
        assert (d.xyxy[:, [0, 2]] <= width).all() and (d.xyxy[:, [1, 3]] <= height).all() and (d.xyxy >= 0).all()
        assert (d.xyxy[:, 2] > d.xyxy[:, 0]).all() and (d.xyxy[:, 3] > d.xyxy[:, 1]).all()


def test_batched_results_equal_one_frame_at_a_time(first_100):
    detector = darknet()
    batch = as_frames(first_100[:6])
    detector.process(batch)
    for frame in batch:
        alone = as_frames([frame.image])
        detector.process(alone)
        np.testing.assert_allclose(alone[0].detections.xyxy, frame.detections.xyxy, atol=0.5)
        np.testing.assert_allclose(alone[0].detections.confidence, frame.detections.confidence, atol=1e-3)


def test_boxes_map_back_to_each_frames_own_size(first_100):
    detector = darknet()
    full = as_frames(first_100[:1])
    half = as_frames([cv2.resize(first_100[0], (384, 288))], camera="small")
    detector.process(full + half)
    big, small = full[0].detections, half[0].detections
    assert len(big) >= 3 and abs(len(big) - len(small)) <= 1
    # the clearest person lands at half the coordinates in the half-size frame
    best_big = big.xyxy[np.argmax(big.confidence)]
    best_small = small.xyxy[np.argmax(small.confidence)]
    np.testing.assert_allclose(best_small * 2, best_big, atol=8)


def test_class_filter_by_unknown_name_is_a_config_error():
    with pytest.raises(PluginConfigError, match="the model has no class 'unicorn'") as info:
        darknet(classes=["unicorn"])
    assert info.value.key == "classes"


def test_all_classes_when_no_filter(first_100):
    detector = darknet(classes=None, confidence=0.2)
    frames = as_frames(first_100[:20])
    detector.process(frames)
    labels = {f.detections.label(i) for f in frames for i in range(len(f.detections))}
    assert "person" in labels
    assert all(f.detections.class_names[0] == "person" and len(f.detections.class_names) == 80 for f in frames)


def test_ultralytics_backend_built_from_architecture_runs_batched_on_cpu(first_100):
    """No ultralytics weights can be downloaded here: yolov8n.yaml builds the real network, untrained."""
    config = DetectorConfig(
        weights="yolov8n.yaml", confidence=0.0001, input_size=320, classes=[0, 2]
    )  # a yaml-built model has numeric names
    detector = Detector(config, PluginContext("cpu", {}))
    detector.start()
    assert len(detector.backend.class_names) == 80
    frames = as_frames(first_100[:3])
    detector.process(frames)
    for frame in frames:
        d = frame.detections
        assert d.xyxy.dtype == np.float32 and d.xyxy.shape[1] == 4
        assert set(d.class_id.tolist()) <= {0, 2}
        width, height = frame.size
        assert (d.xyxy[:, [0, 2]] <= width + 1).all() and (d.xyxy[:, [1, 3]] <= height + 1).all()


def test_confidence_below_opencvs_default_floor_is_honoured(first_100):
    """OpenCV's YOLO layer zeroes scores under 0.2 unless the cfg says otherwise; `confidence: 0.1` must still work."""
    frames = as_frames(first_100[:10])
    darknet(confidence=0.1).process(frames)
    scores = np.concatenate([f.detections.confidence for f in frames])
    assert scores.min() >= 0.1
    assert ((scores >= 0.1) & (scores < 0.2)).sum() >= 3, "no boxes between 0.1 and 0.2: the floor is still 0.2"


@pytest.mark.parametrize(
    ("device", "half", "placement"),
    [
        ("cpu", False, (cv2.dnn.DNN_BACKEND_OPENCV, cv2.dnn.DNN_TARGET_CPU, None)),
        ("cpu", True, (cv2.dnn.DNN_BACKEND_OPENCV, cv2.dnn.DNN_TARGET_CPU, None)),
        ("cuda", True, (cv2.dnn.DNN_BACKEND_CUDA, cv2.dnn.DNN_TARGET_CUDA_FP16, 0)),
        ("cuda:0", False, (cv2.dnn.DNN_BACKEND_CUDA, cv2.dnn.DNN_TARGET_CUDA, 0)),
        ("cuda:1", False, (cv2.dnn.DNN_BACKEND_CUDA, cv2.dnn.DNN_TARGET_CUDA, 1)),
        ("cuda:3", True, (cv2.dnn.DNN_BACKEND_CUDA, cv2.dnn.DNN_TARGET_CUDA_FP16, 3)),
    ],
)
def test_darknet_runs_in_the_precision_half_says_on_the_gpu_the_device_names(device, half, placement):
    """It forced the FP16 target whatever `half` said, and put every cuda:N on the thread's current GPU."""
    assert dnn_placement(device, half) == placement


@pytest.mark.skipif(cv2.cuda.getCudaEnabledDeviceCount() > 0, reason="this OpenCV has CUDA")
def test_darknet_on_a_gpu_this_opencv_cannot_use_runs_on_the_cpu_and_says_so(first_100, caplog):
    """`runtime: opencv`: the pip wheels of OpenCV have no CUDA: `cuda:1` falls back to the CPU with a warning, and
    still finds people."""
    with caplog.at_level(logging.WARNING, logger="vigild.plugins.darknet"):
        detector = darknet("cuda:1", runtime="opencv")
    assert "sees no CUDA device 1: the darknet detector runs on the CPU" in caplog.text
    assert detector.backend.cuda_index is None
    frames = as_frames(first_100[:4])
    detector.process(frames)
    assert all(len(frame.detections) >= 1 for frame in frames)
