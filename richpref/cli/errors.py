"""How every `richpref` command reports an input it refuses: one line on stderr, an exit code."""
from __future__ import annotations

import sys


MODEL_MISSING = 3  # the exit code of a model that is not there (richpref doctor's ModelProblem too)


def fail(exc: BaseException | str, code: int = 2) -> int:
    """Print `error: <message>` (the message names the input and the fix) and return the exit code.

    2: bad input refused before any work (config, data, arguments); 3: a model that cannot be found or
    loaded, refused before any work (MODEL_MISSING); 1: the work started and failed.
    """
    print(f"error: {exc}", file=sys.stderr)
    return code
