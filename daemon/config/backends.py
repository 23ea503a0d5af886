"""Which capture back end a camera gets on this machine: `backend: auto` resolved, and a back end that cannot open
the camera here named with the reason.

Asked where capture starts and by `vigild check`/`run` before anything starts, never while a config is validated:
settings check values only, and loading a config must not start GStreamer (`Gst.init`) or need it installed.
Here in the config (`Config.backends`), below capture, which asks it too; GStreamer itself is vigild.gstreamer's.
"""

from __future__ import annotations

from vigild.config.settings import CameraConfig
from vigild.config.sources import SourceKind
from vigild.gstreamer import gstreamer_available, resolve_backend


class BackendUnavailable(ValueError):
    """The camera's back end is not installed here; the message says what to install or choose instead."""


def camera_backend(camera: CameraConfig, kind: SourceKind) -> str:
    """`gstreamer` or `opencv` for `camera` (whose source is of `kind`); raises `BackendUnavailable` when this machine
    lacks what it needs. Imports (and initialises) GStreamer unless the camera asks for OpenCV."""
    if camera.backend == "gstreamer" and not gstreamer_available():
        raise BackendUnavailable(
            "backend: gstreamer, but GStreamer or PyGObject is not installed (pip install vigild[gstreamer]); "
            "use backend: auto or opencv"
        )
    backend = resolve_backend(camera.backend)
    if kind is SourceKind.TEST and backend == "opencv" and camera.backend == "auto":  # opencv asked: a settings error
        raise BackendUnavailable(
            "source: test:// patterns need the GStreamer back end, but GStreamer is not installed "
            "(pip install vigild[gstreamer])"
        )
    return backend
