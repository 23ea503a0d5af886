"""Run only by test_hermetic.py, in a pytest of its own whose HOME stands for the real one: a test that escapes its
fresh HOME (VT_PROBE=escape) must fail that run; one that stays inside it (VT_PROBE=stay) must not."""

import os

from hermetic import REAL_HOME


def test_probe():
    assert os.environ["HOME"] != str(REAL_HOME)
    if os.environ.get("VT_PROBE") == "escape":
        target = REAL_HOME / ".local" / "state" / "vigild"
        target.mkdir(parents=True)
        (target / "control").write_text("")
    else:
        (REAL_HOME.parent / "elsewhere").mkdir()  # beside the watched HOME: not its business
