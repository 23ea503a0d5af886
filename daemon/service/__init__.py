"""The service around the pipeline: start/stop, control socket, metrics, systemd, CURVE keys."""
