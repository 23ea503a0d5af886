"""GStreamer, loaded once per process: its modules initialised (hardware decoders ranked first), whether this
machine has it at all, and `backend: auto` resolved.

Below the config (vigild.config.backends asks it which back end a camera gets here) and capture (the pipelines and
readers, vigild.capture.gst_pipeline). Importing this module imports no GStreamer: it is loaded on the first call.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger("vigild.capture")

HARDWARE_DECODERS = (
    "nvh264dec",
    "nvh265dec",
    "nvv4l2decoder",
    "vah264dec",
    "vah265dec",
    "vaapih264dec",
    "vaapih265dec",
    "v4l2slh264dec",
    "v4l2h264dec",
)
"""Decoder factories that use a GPU or a video engine; `decoder: auto` ranks them above the software ones. Any
other decoder whose element class says `Hardware` (GStreamer's convention, e.g. `Codec/Decoder/Video/Hardware`)
counts as one too for error classification and `decoder: software`, but keeps its own rank."""


def gst_modules() -> Any:
    """`(Gst, GstApp, GstVideo)`, initialised; raises ImportError when PyGObject or GStreamer is missing."""
    return _gst_modules()


@functools.cache
def _gst_modules() -> Any:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstApp", "1.0")
    gi.require_version("GstVideo", "1.0")
    from gi.repository import Gst, GstApp, GstVideo

    Gst.init(None)
    _prefer_hardware_decoders(Gst)
    return Gst, GstApp, GstVideo


@functools.cache
def gstreamer_available() -> bool:
    try:
        gst_modules()
    except (ImportError, ValueError) as exc:  # ValueError: gi present but the GStreamer typelib is not
        log.debug("GStreamer unavailable: %s", exc)
        return False
    return True


def resolve_backend(backend: str) -> str:
    """`auto` → `gstreamer` when PyGObject and GStreamer are installed, else `opencv`."""
    if backend != "auto":
        return backend
    return "gstreamer" if gstreamer_available() else "opencv"


def _prefer_hardware_decoders(gst: Any) -> None:
    """decodebin picks the highest-ranked decoder that can start; put the hardware ones first.

    A hardware decoder whose device is missing fails to start, and decodebin moves on to the next one, so a
    machine without a GPU falls back to software decoding on its own.
    """
    registry = gst.Registry.get()
    for name in HARDWARE_DECODERS:
        feature = registry.lookup_feature(name)
        if feature is not None:
            feature.set_rank(gst.Rank.PRIMARY + 100)
