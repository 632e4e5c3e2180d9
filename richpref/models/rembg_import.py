"""rembg, imported without compiling pymatting.

rembg imports pymatting for its alpha matting, which richpref does not use (the cut-out stage calls
the sessions' `predict`, never `rembg.remove`). pymatting's functions are compiled by numba as they
are defined: 27 s of CPU the first time an environment imports rembg (46 s measured on another fresh
machine), 0.6 s once numba's cache is written beside them; in a fresh container, or a read-only
site-packages, every process paid it again. With numba's compiler off while rembg imports, those
functions stay plain Python (never called here) and the import takes 0.4 s. The switch is numba's
own (`numba.config.DISABLE_JIT`, read as a function is defined) and set back at once.

Importing this module imports rembg that way: the cut-out loader does (models/cutout.py), and a
local cluster's forkserver preloads it by name (run/early_cluster.py).
"""
from __future__ import annotations

from .runtime import keep_torch_threads


def _import_rembg() -> None:
    try:
        import numba
    except ImportError:  # then no pymatting to compile either: rembg's own import names what is missing
        import rembg  # noqa: F401
        return
    compiling = numba.config.DISABLE_JIT
    numba.config.DISABLE_JIT = True
    try:
        import rembg  # noqa: F401
    finally:
        numba.config.DISABLE_JIT = compiling


with keep_torch_threads():  # numba's OpenMP start resets torch's thread count
    _import_rembg()

from rembg import new_session  # noqa: E402
from rembg.sessions import sessions_names  # noqa: E402  the session names this rembg knows

__all__ = ["new_session", "sessions_names"]
