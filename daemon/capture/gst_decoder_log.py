"""Decoder errors that GStreamer reports only in its debug log, counted for the camera whose pipeline decoded them.

Kept apart from the reader: one log function serves the whole process, and finds the reader a line belongs to
through the small `LoggedReader` protocol.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import weakref
from typing import Any, Protocol

log = logging.getLogger("vigild.capture")


class LoggedReader(Protocol):
    """What the log asks of a reader: whether a line's element is in its pipeline, and to count the line."""

    def owns(self, element: Any) -> bool:
        """Whether `element` (any element, or a top-level pipeline) belongs to this reader's pipeline."""

    def has_element_named(self, name: str) -> bool:
        """Whether an element of this name is in this reader's pipeline."""

    def count_logged_error(self) -> None:
        """One more decoder error; called on a decoder's thread, under the log's lock."""


class DecoderErrorLog:
    """Counts the errors decoders report only in GStreamer's debug log, for the camera whose pipeline decoded them.

    FFmpeg (inside `avdec_*`) conceals a damaged slice or macroblock and carries on: the frame is delivered, no
    bus message is posted, the buffer is not marked; the only trace is an error line from FFmpeg
    (`error while decoding MB 38 13`), which gst-libav routes to GStreamer's `libav` debug category at ERROR level
    without naming the element. One log function for the process receives those lines and gives each to the reader
    whose pipeline the logging thread works for: FFmpeg's decoding threads are started by (and named after, as Linux
    names a new thread after the one that creates it) the GStreamer streaming thread that opened the decoder, e.g.
    `qtdemux3:sink` or `multiqueue7:src`; element names like `qtdemux3` are unique in the process, so the reader
    whose pipeline has that element is the one. A line whose thread cannot be traced to exactly one live pipeline
    is not counted. gst-libav's own errors, which do name the element, go to the pipeline holding it.

    Only the `libav` category is raised to ERROR, so a healthy stream costs nothing. When `GST_DEBUG` is not set
    GStreamer's default log function (which would print those lines to stderr) is removed; with `GST_DEBUG` set it
    stays, as the user asked to see the log.
    """

    CATEGORY = "libav"

    def __init__(self, gst: Any):
        self._gst = gst
        self._readers: weakref.WeakSet[LoggedReader] = weakref.WeakSet()
        self._lock = threading.Lock()
        if "GST_DEBUG" not in os.environ:
            _remove_default_log_function()
            gst.debug_set_threshold_for_name(self.CATEGORY, gst.DebugLevel.ERROR)
        gst.debug_add_log_function(self._log, None)

    def watch(self, reader: LoggedReader) -> None:
        with self._lock:
            self._readers.add(reader)

    def _log(
        self, category: Any, level: Any, _file: str, _function: str, _line: int, obj: Any, _message: Any, *_: Any
    ) -> None:
        if level > self._gst.DebugLevel.ERROR or category.get_name() != self.CATEGORY:
            return
        try:
            with self._lock:
                readers = list(self._readers)
            if obj is not None and hasattr(obj, "get_parent"):
                owners = [reader for reader in readers if reader.owns(obj)]
            else:
                element = _creator_element_name()
                owners = [reader for reader in readers if reader.has_element_named(element)] if element else []
            if len(owners) == 1:
                with self._lock:
                    owners[0].count_logged_error()
        except Exception:  # never let a log line break a decoding thread
            log.debug("cannot attribute a decoder log line", exc_info=True)


@functools.cache
def decoder_error_log(gst: Any) -> DecoderErrorLog:
    return DecoderErrorLog(gst)


def _creator_element_name() -> str | None:
    """`qtdemux3` from this thread's name `qtdemux3:sink` (Linux keeps 15 characters of it: a name cut before
    its `:` cannot be trusted)."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", encoding="utf-8", errors="replace") as comm:
            name = comm.read().strip()
    except OSError:
        return None
    element, colon, _pad = name.partition(":")
    return element if colon and element else None


def _remove_default_log_function() -> None:
    try:
        library = ctypes.CDLL("libgstreamer-1.0.so.0")
        library.gst_debug_remove_log_function(ctypes.cast(library.gst_debug_log_default, ctypes.c_void_p))
    except (OSError, AttributeError) as exc:
        log.debug("cannot remove GStreamer's default log function: %s", exc)
