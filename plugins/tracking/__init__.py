"""Multi-object trackers (ByteTrack, BoT-SORT) over every camera of a batch at once."""
