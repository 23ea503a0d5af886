"""BoT-SORT's camera-motion compensation for plugins/tracking/multicamera_tracker.py: ultralytics' GMC, one per
camera, estimating how the image moved since the camera's previous frame so that its tracks can be moved with it.

A step estimates on copies, held in the step's `pending` dict until it commits (`commit`): a step that fails
leaves every camera's previous frame as it was.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from vigild.plugins.tracking.multicamera_tracker import CameraFrame

log = logging.getLogger("vigild.plugins.tracker")


class CameraMotion:
    def __init__(self, method: str):
        self.method = method
        self._gmc: dict[int, Any] = {}  # per camera slot

    def estimate(self, slot: int, frame: CameraFrame, boxes: np.ndarray, pending: dict[int, Any]) -> np.ndarray:
        """The 2x3 affine from the camera's previous frame to `frame.image` (`boxes`: its confident detections, left
        out of the estimate); the compensator that saw `frame` goes into `pending`."""
        from ultralytics.trackers.utils.gmc import GMC

        if frame.image is None:
            raise ValueError("camera-motion compensation needs the frame's image")
        known = self._gmc.get(slot)
        # GMC.apply replaces its previous frame and key points (never changes them in place): a shallow copy keeps
        # the committed one as it was until the step commits.
        gmc = pending[slot] = copy.copy(known) if known is not None else GMC(method=self.method)
        try:
            affine: np.ndarray = gmc.apply(frame.image, boxes)
        except Exception as exc:  # e.g. the camera's frame size changed: start afresh from this frame
            log.warning("%s camera-motion compensation failed on camera %s frame %d (%s: %s); restarting it",
                        self.method, frame.camera, frame.index, type(exc).__name__, exc)  # fmt: skip
            gmc = pending[slot] = GMC(method=self.method)
            affine = gmc.apply(frame.image, boxes)
        return affine

    def commit(self, pending: dict[int, Any]) -> None:
        self._gmc.update(pending)

    def forget(self, slot: int) -> None:
        self._gmc.pop(slot, None)
