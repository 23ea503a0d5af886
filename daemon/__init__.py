"""vigild: a real-time video analytics daemon (capture -> batched plugin chain -> ZeroMQ events)."""

__version__ = "0.1.0"
