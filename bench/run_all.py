"""Run every benchmark on the harness, one after another, then regenerate docs/benchmarks.md.

    python bench/run_all.py --quick [--models-root DIR] [--only NAME ...] [--skip NAME ...]
    python bench/run_all.py                 # full sizes (hours on a CPU; the sizes of docs/benchmarks.md)

Each benchmark writes bench/results/<bench>-<commit>.json itself; this script adds
bench/results/run_all-<commit>.json (each benchmark's wall time; headline: the total, goal < 15 min
for --quick) and then runs bench/report.py. A benchmark that fails is reported and the others still run.
The DPO step comparison needs diffusers' example script: --diffusers-git (a diffusers git dir) or
DIFFUSERS_GIT; without one it is skipped and said so.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import harness

REPO = harness.REPO
PY = sys.executable
B = "bench/"


def plan(quick: bool, models: str, diffusers: str | None) -> list[tuple[str, list[str]]]:
    q = quick
    jobs = [
        ("instruction_guards", [B + "instruction_guards.py"]),
        ("source_stream_limit", [B + "source_stream.py", "limit"] + (["--rows", "3000"] if q else [])),
        ("source_stream_first_shard", [B + "source_stream.py", "first-shard"] + (["--rows", "20000"] if q else [])),
        ("filter_encodings", [B + "filter_encodings.py", "--models-root", models]
         + (["--pairs", "4", "--repeats", "2"] if q else [])),
        ("overlap", [B + "overlap.py", "--models-root", models]
         + (["--n", "16", "--batch", "8", "--repeats", "2"] if q else ["--n", "64", "--batch", "16"])),
        ("dpo_step", [B + "dpo_step.py", "--diffusers-git", diffusers or "",]
         + (["--steps", "8", "--warmup", "2", "--rounds", "2"] if q else [])),
        # Each curate process costs 1-3 min on a loaded 2-core machine: one repeat at quick size.
        ("curate_resume", [B + "curate_runs.py", "resume", "--models", models] + (["--quick", "--repeats", "1"] if q else [])),
        ("memory", [B + "curate_runs.py", "memory", "--models", models]
         + (["--quick", "--repeats", "1", "--items", "4", "8", "16"] if q else [])),
    ]
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: every benchmark, under 15 minutes")
    p.add_argument("--models-root", default=os.environ.get("RICHPREF_MODELS_ROOT", str(REPO / "data/models/tiny")))
    p.add_argument("--diffusers-git", default=os.environ.get("DIFFUSERS_GIT"))
    p.add_argument("--only", nargs="+")
    p.add_argument("--skip", nargs="+", default=[])
    a = p.parse_args(argv)
    b = harness.Bench("run_all" + ("_quick" if a.quick else ""), repeats=1)
    env = {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
           "HF_HUB_OFFLINE": "1", "RICHPREF_MODELS_ROOT": a.models_root}
    runs, failed, t_all = [], [], time.perf_counter()
    for name, args in plan(a.quick, a.models_root, a.diffusers_git):
        if (a.only and name not in a.only) or name in a.skip:
            continue
        if name == "dpo_step" and not a.diffusers_git:
            print("[run_all] dpo_step skipped: no --diffusers-git / DIFFUSERS_GIT (diffusers' example script)", flush=True)
            runs.append({"side": name, "repeat": 0, "skipped": True})
            continue
        print(f"[run_all] {name}: {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([PY] + args, cwd=REPO, env=env).returncode
        wall = time.perf_counter() - t0
        runs.append({"side": name, "repeat": 0, "wall_s": wall, "rc": rc})
        print(f"[run_all] {name}: exit {rc} after {wall:.0f} s", flush=True)
        if rc:
            failed.append(name)
    total = time.perf_counter() - t_all
    runs.append({"side": "total", "repeat": 0, "wall_s": total})
    goal = "< 900" if a.quick else None
    b.write(harness.headline("total.wall_s", total, "s", goal,
                             note="wall time of every benchmark of the quick set, one after another"
                                  + (f"; failed: {', '.join(failed)}" if failed else "")), runs=runs)
    b.cleanup()
    subprocess.run([PY, B + "report.py"], cwd=REPO, env=env, check=True)
    print(f"[run_all] total {total:.0f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
