"""vigild's built-in plugins. Each module holds one plugin: its pydantic `Config` and its `Plugin` class."""
