"""Capture: one thread per camera reading frames through a back end (GStreamer or OpenCV)."""
