"""argparse types of counts and ports: a value out of range is a usage error (exit 2) naming it, not a
traceback or a run that fails once started. The CLI's and the standalone servers' parsers share them."""
from __future__ import annotations

import argparse


def at_least(low: int):
    """argparse type of a count: a whole number of at least `low` (a usage error otherwise, not a run
    that silently takes another value or fails once started)."""
    def count(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is below {low}")
        return n
    return count


def port(value: str) -> int:
    """argparse type of a TCP port, 0..65535 (0: any free one)."""
    n = at_least(0)(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"{n} is above 65535, the last TCP port")
    return n
