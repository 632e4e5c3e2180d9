"""Processes a test spawns as the processes of one distributed run (gloo on CPU), and whether a process
is gone."""
from __future__ import annotations

import multiprocessing
import os


def run_spawned(target, args_per_process: list[tuple], timeout: float = 120) -> list[int | None]:
    """One process per args tuple, spawned (not forked: a fork of a process whose autograd threads
    already ran, an earlier training test in the same pytest worker, fails in the child's backward),
    waited for, and killed if still alive; their exit codes."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_per_process]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [p.exitcode for p in procs]


def gone(pid: int) -> bool:
    """Whether process `pid` has exited: no such process, or a zombie not yet reaped (state Z or X),
    which still answers kill(0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] in "ZX"
    except OSError:
        return True
