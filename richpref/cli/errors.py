"""How every `richpref` command reports an input it refuses: one line on stderr, an exit code."""
from __future__ import annotations

import sys


def fail(exc: BaseException | str, code: int = 2) -> int:
    """Print `error: <message>` (the message names the input and the fix) and return the exit code.

    2: bad input refused before any work (config, data, arguments); 1: the work started and failed.
    """
    print(f"error: {exc}", file=sys.stderr)
    return code
