"""Argument types of the command line that check their range, so that a wrong number is argparse's usage error
(exit 2, naming the option) rather than a traceback where it is used: SQLite's integers stop at 2^63 - 1, a
negative seq or count means nothing, a timeout is a finite number of seconds."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

INT64_MAX = 2**63 - 1


def integer(minimum: int = 0, maximum: int = INT64_MAX) -> Callable[[str], int]:
    """An argparse `type`: a whole number from `minimum` to `maximum`."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not minimum <= value <= maximum:
            upper = "2^63 - 1" if maximum == INT64_MAX else str(maximum)
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {minimum} to {upper}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message only when the function raises ValueError
    return parse


def seconds(text: str) -> float:
    """An argparse `type`: a finite, positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text}: expected a finite number of seconds above 0")
    return value
