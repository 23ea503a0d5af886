"""Capture: one thread per camera reading frames through a back end (GStreamer or OpenCV), into the exchange the
pipeline's scheduler takes them from."""
