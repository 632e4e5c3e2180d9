"""CPU seconds the live dispatch (richpref/run/dispatch.py) spends per model shard, as a run grows.

The dispatch runs in the flow's process and decides, for every shard that finishes, what each worker
runs next; its cost per shard should not grow with the run. Here its real code runs against the
tests' simulated cluster (tests/dispatch_sim.py; no Dask, no Prefect: a clock, 8 workers that run
their shards one after another, a load when the stage changes), so the figure is the dispatch's own
decisions and bookkeeping plus the simulation's: a chain of three model stages (0.1, 1.0 and 0.4 s a
shard, 1 s loads), N shards each.

On the harness (a fresh process; one repeat by default): raw figures in
bench/results/dispatch_scale-<commit>.json. Headline: the CPU per shard at the largest N over that at
the smallest (`growth`; 1 is linear in shards).

    PYTHONPATH=$PWD .venv/bin/python bench/dispatch_scale.py               # N = 1000 4000 16000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402
from dispatch_sim import Simulated, Stage  # noqa: E402 - the tests' simulated cluster

SHARD_S = {"a": 0.1, "b": 1.0, "c": 0.4}
LOAD_S = {"a": 1.0, "b": 1.0, "c": 1.0}


def dispatch_cpu(n: int, workers: int = 8) -> dict:
    stages = [Stage("a", ()), Stage("b", ("a",)), Stage("c", ("b",))]
    todo = [(i, st, s) for i, st in enumerate(stages) for s in range(n)]
    sim = Simulated(todo, SHARD_S, LOAD_S, [f"w{i}" for i in range(workers)], SHARD_S, LOAD_S, preload=False)
    t0 = time.process_time()
    report = sim.run()
    cpu = time.process_time() - t0
    assert sum(report.shards.values()) == len(todo)
    return {"shards": len(todo), "cpu_s": cpu, "ms_per_shard": 1000 * cpu / len(todo)}


def child(args) -> None:
    rows = []
    for n in args.n:
        rows.append(dispatch_cpu(n))
        print(f"N={n} a stage: {rows[-1]['shards']} model shards, dispatch {rows[-1]['cpu_s']:.2f} s CPU, "
              f"{rows[-1]['ms_per_shard']:.4f} ms a shard", flush=True)
    out = {f"n{r['shards']}.ms_per_shard": r["ms_per_shard"] for r in rows}
    out["growth"] = rows[-1]["ms_per_shard"] / rows[0]["ms_per_shard"]
    harness.print_child("RESULT ", {"dispatch": out})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 4000, 16000], help="shards a stage")
    args = harness.child_args(ap, repeats=1).parse_args()
    if args.child:
        return child(args)
    harness.run("dispatch_scale", args.repeats, ["dispatch"], "dispatch.growth", "x", "<= 1.5",
                script=__file__, args=harness.child_argv(sys.argv[1:]),
                note=f"the live dispatch's CPU a model shard at N = {args.n[-1]} shards a stage over that at "
                     f"N = {args.n[0]} (three model stages, 8 simulated workers, no Dask or Prefect)")


if __name__ == "__main__":
    main()
