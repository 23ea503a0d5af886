"""Recording (docs/recording.md): clips around events and continuous segments, kept by retention. The capture side
(vigild.capture.recorder) keeps the encoded stream and writes the files; this package decides which clips to make
and keeps their records."""
