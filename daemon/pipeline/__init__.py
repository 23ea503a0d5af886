"""The pipeline: the frame exchange, the scheduler's batches and the plugin chain."""
