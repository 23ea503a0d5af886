"""Settings, their loading from YAML and the wording of config errors."""
