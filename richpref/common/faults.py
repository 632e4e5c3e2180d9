"""Fault injection (RICHPREF_FAULTS): how tests and benchmarks simulate crashes in the shard runner."""
from __future__ import annotations

import os
import signal


class InjectedFault(RuntimeError):
    """Raised where RICHPREF_FAULTS asks for it."""


class SimulatedOutOfMemory(InjectedFault):
    """An out-of-memory error injected by RICHPREF_FAULTS ("stage:shard:oom")."""


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (SimulatedOutOfMemory, torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def inject_fault(stage: str, shard: int, when: str) -> None:
    """RICHPREF_FAULTS="edit:1:raise,cutout:0:kill-after" fails shard 1 of edit before computing and
    SIGKILLs the process right after shard 0 of cutout is committed. Kinds: raise, kill (before
    computing), kill-write (output written to its temp name, not yet renamed), kill-after (committed),
    oom (out of memory on the first attempt at the configured batch size), sleep-N (N seconds
    before computing: a shard held long enough to kill its holder mid-shard). Unset in normal runs."""
    spec = os.environ.get("RICHPREF_FAULTS", "")
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        name, idx, kind = parts[0], int(parts[1]), (parts[2] if len(parts) > 2 else "raise")
        if name != stage or idx != shard:
            continue
        if kind == "raise" and when == "before":
            raise InjectedFault(f"injected fault in {stage} shard {shard} (RICHPREF_FAULTS)")
        if kind == "oom" and when == "compute-first":
            raise SimulatedOutOfMemory(f"simulated out of memory in {stage} shard {shard} (RICHPREF_FAULTS)")
        if kind.startswith("sleep-") and when == "before":
            import time

            time.sleep(float(kind[6:]))
        if (kind, when) in (("kill", "before"), ("kill-write", "write"), ("kill-after", "after")):
            os.kill(os.getpid(), signal.SIGKILL)
