"""The pipeline: the scheduler's batches (taken from capture's frame exchange) and the plugin chain."""
