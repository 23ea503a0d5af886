"""Model back ends that plugins share: each turns a batch of BGR frames into `Detections`."""
