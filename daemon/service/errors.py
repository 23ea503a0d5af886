"""The error a control command answers with (`{"ok": false, "error": {"code": ..., "message": ...}}`,
docs/control.md): raised by the daemon's changes (vigild.service.reconfigure, cameras, running) and answered by the
control socket (vigild.service.control), which re-exports it. A module of its own, so that those modules need not
import the control socket's."""

from __future__ import annotations


class CommandError(Exception):
    """A command that cannot be done; `code` is stable for programs, `message` is for people."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)
