"""BoT-SORT multi-object tracker (motion only) over any detector's output, each camera tracked on its own.

BoT-SORT as ultralytics implements it: ByteTrack's two-stage matching with a Kalman filter on box width and height
(steadier for objects that change shape), optionally global motion compensation for moving cameras
(`gmc_method`, ultralytics' GMC; off by default: it runs over every full frame, and vigild's cameras are usually
fixed). Appearance re-identification is not offered (see docs/analytics.md). Vectorised across cameras, ids,
events and the per-camera lifecycle: as ByteTrack (plugins/tracking/bytetrack.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vigild.plugins.tracking.bytetrack import ByteTrack, ByteTrackConfig


class BotSortConfig(ByteTrackConfig):
    type: Literal["botsort"] = "botsort"  # type: ignore[assignment]  # a subclass of its own type
    gmc_method: Literal["none", "sparseOptFlow", "orb", "ecc"] = Field(
        "none", description="Camera-motion compensation for moving (PTZ, handheld) cameras; costs CPU per frame."
    )


class BotSort(ByteTrack):
    Config = BotSortConfig
    box_form = "xywh"

    def _motion_compensation(self) -> str | None:
        assert isinstance(self.config, BotSortConfig)
        return None if self.config.gmc_method == "none" else self.config.gmc_method
