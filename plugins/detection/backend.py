"""The one interface every detector back end implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from vigild.frame import Detections


class DetectorBackend(ABC):
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    """(width, height) of the model's input: crops for `detect: regions` are cut at least this size."""
    class_filter: np.ndarray | None = None
    """Class ids to keep (sorted), or None for all; set by the plugin once `class_names` is known."""

    @abstractmethod
    def detect(self, images: list[np.ndarray]) -> list[Detections]:
        """One `Detections` per image, boxes in that image's own pixels, filtered and NMS-ed."""
