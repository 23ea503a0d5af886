"""BoT-SORT multi-object tracker (motion only), one independent tracker per camera, over any detector's output.

ultralytics' BOTSORT: ByteTrack's two-stage matching with a Kalman filter on box width and height (steadier for
objects that change shape), optionally global motion compensation for moving cameras (`gmc_method`; off by
default: it runs optical flow over every full frame, and vigild's cameras are usually fixed). Appearance
re-identification is not enabled. Ids, events and the per-camera lifecycle are ByteTrack's (plugins/bytetrack.py).
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any, Literal

import numpy as np
from pydantic import Field

from vigild.frame import Frame
from vigild.plugins.bytetrack import ByteTrack, ByteTrackConfig


class BotSortConfig(ByteTrackConfig):
    type: Literal["botsort"] = "botsort"
    gmc_method: Literal["none", "sparseOptFlow", "orb", "ecc"] = Field(
        "none", description="Camera-motion compensation for moving (PTZ, handheld) cameras; costs CPU per frame."
    )


class BotSort(ByteTrack):
    Config = BotSortConfig

    def _tracker_type(self) -> Any:
        from ultralytics.trackers.bot_sort import BOTSORT

        return BOTSORT

    def _tracker_args(self) -> Namespace:
        assert isinstance(self.config, BotSortConfig)
        return Namespace(
            **vars(super()._tracker_args()),
            gmc_method=self.config.gmc_method,
            proximity_thresh=0.5,  # used by re-identification only, which is off
            appearance_thresh=0.8,
            with_reid=False,
            model="auto",
        )

    def _image_for(self, frame: Frame) -> np.ndarray | None:
        assert isinstance(self.config, BotSortConfig)
        return frame.image if self.config.gmc_method != "none" else None
