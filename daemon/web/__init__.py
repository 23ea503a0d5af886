"""The web console (docs/web.md): vigild.web.server serves it, vigild.web.live makes its live pictures, vigild.web.auth guards it."""
