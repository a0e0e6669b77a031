"""argparse types that turn bad numbers into usage errors (exit 2) before anything runs.

Why: ``float("nan")`` parses, and NaN compares false with every bound, so a
``--duration nan`` used to reach the agents (and a watch never ended).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

MAX_STREAM_S = 24 * 3600.0  # the agent's own bound on a watch or capture


def seconds(limit: float) -> Callable[[str], float]:
    """argparse type: a finite number of seconds in [0, limit] (NaN, inf, -1 are usage errors)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of seconds") from None
        if not math.isfinite(value) or not 0 <= value <= limit:
            raise argparse.ArgumentTypeError(
                f"{text[:40]} is not a number of seconds between 0 and {limit:g}"
            )
        return value

    return parse


def int_range(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse
