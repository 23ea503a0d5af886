"""Moved to vigild.curve, below the layers that use it (docs/design.md#layers); this name is kept for programs that
import `ClientKeys` from here (docs/security.md showed it so)."""

from vigild.curve import ClientKeys, CurveServer, bind_secured, keygen

__all__ = ["ClientKeys", "CurveServer", "bind_secured", "keygen"]
