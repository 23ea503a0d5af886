"""Zone and line analytics over tracked objects."""
