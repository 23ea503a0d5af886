"""Image and model helpers that plugins share: letterboxing, devices, masks, snapshots."""
