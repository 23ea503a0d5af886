"""Ultralytics YOLO detectors: `.pt` weights, exported `.onnx`/`.engine` files, or a model name.

A bare name such as `yolov8n.pt` is resolved by ultralytics (downloaded when the machine is online); a name such
as `yolov8n.yaml` builds the architecture with untrained weights, which is what the offline tests and
throughput benchmarks use. Ultralytics batches the list of frames itself and returns boxes in each frame's pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vigild.frame import Detections
from vigild.plugins.backends.base import DetectorBackend


class UltralyticsBackend(DetectorBackend):
    def __init__(
        self,
        weights: str,
        input_size: tuple[int, int] | None,
        confidence: float,
        nms_iou: float,
        device: str,
        half: bool,
    ):
        from ultralytics import YOLO  # imported here: it is slow to import and only this back end needs it

        self.model = YOLO(weights, task="detect")
        names: Any = self.model.names
        self.class_names = tuple(names[i] for i in range(len(names))) if isinstance(names, dict) else tuple(names)
        # ultralytics takes (height, width)
        self.imgsz: int | tuple[int, int] = (input_size[1], input_size[0]) if input_size else 640
        self.confidence = confidence
        self.nms_iou = nms_iou
        self.device = device
        self.half = half

    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        results = self.model.predict(
            images,
            imgsz=self.imgsz,
            conf=self.confidence,
            iou=self.nms_iou,
            classes=None if self.class_filter is None else self.class_filter.tolist(),
            device=self.device,
            half=self.half,
            verbose=False,
        )
        out = []
        for result in results:
            boxes: Any = result.boxes.cpu().numpy()  # type: ignore[union-attr]  # a detect model always has boxes
            out.append(Detections.untracked(boxes.xyxy, boxes.conf, boxes.cls.astype(np.int32), self.class_names))
        return out
