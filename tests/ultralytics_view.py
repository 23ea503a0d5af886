"""Detections as ultralytics' trackers read them, to run those side by side with vigild's: for
tests/test_multicamera_tracker.py and bench/trackers.py."""

from __future__ import annotations

from typing import Any

import numpy as np

from vigild.frame import Detections


class UltralyticsView:
    """The results-like object ultralytics' BYTETracker and BOTSORT take (`conf`, `cls`, `xywh`, `xyxy`, boolean
    indexing)."""

    def __init__(self, detections: Detections):
        self.xyxy, self.conf, self.cls = detections.xyxy, detections.confidence, detections.class_id

    @property
    def xywh(self) -> np.ndarray:
        wh = self.xyxy[:, 2:4] - self.xyxy[:, 0:2]
        return np.concatenate([self.xyxy[:, 0:2] + wh / 2, wh], axis=1)

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, index: Any) -> UltralyticsView:
        view = UltralyticsView.__new__(UltralyticsView)
        view.xyxy, view.conf, view.cls = self.xyxy[index], self.conf[index], self.cls[index]
        return view
