"""Run every benchmark on the harness, one after another, then regenerate docs/benchmarks.md.

    python bench/run_all.py --quick [--models-root DIR] [--only NAME ...] [--skip NAME ...] [--list]
    python bench/run_all.py                 # full sizes (hours on a CPU; the sizes of docs/benchmarks.md)

Each benchmark writes bench/results/<bench>-<commit>.json itself; this script prints each benchmark's
wall and CPU seconds (user + system of its processes) and the total, writes
bench/results/run_all[_quick]-<commit>.json (headline: the total wall, goal < 15 min for --quick; a
run limited by --only / --skip is recorded as run_all[_quick]_partial_<its first benchmark>[+n]) and
then runs bench/report.py (docs/benchmarks.md: each benchmark's newest wall and CPU seconds, whole run
or partial, and their sums).
A benchmark that fails is reported and the others still run. A benchmark that cannot run here (a GPU,
a clean clone and install) is listed with the reason it is skipped, and the report shows that line.
The DPO step comparison needs diffusers' example script: --diffusers-git (a diffusers git dir) or
DIFFUSERS_GIT; without one it is skipped and said so.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

import harness

REPO = harness.REPO
PY = sys.executable
B = "bench/"
GPU = "needs a CUDA GPU"
# Skipped by the quick set unless named by --only: several fresh `richpref curate` processes per repeat,
# each ~30 s of CPU even at 8-16 items, so N >= 2 of any of them takes over 2 minutes on 2 idle cores.
SLOW = "too slow for the quick set"
HEAVY = SLOW + ": {} fresh `richpref curate` processes per repeat, N >= 2, over 2 min even at 8-16 items; run it alone with --only {}"


def plan(quick: bool, models: str, diffusers: str | None) -> list[tuple[str, list[str], str | None]]:
    """(name, arguments, why it is skipped or None) per benchmark, in the order they run; `quick` picks
    the small sizes (chosen so the whole set fits 15 minutes on an idle 2-core machine)."""
    q = quick

    def sz(quick_args: list[str], full_args: list[str] | None = None) -> list[str]:
        return quick_args if q else (full_args or [])

    m = ["--models-root", models]
    jobs = [
        ("instruction_guards", [B + "instruction_guards.py"], None),
        ("store_requests", [B + "store_requests.py"] + sz(["--n", "50", "100"]), None),
        ("dispatch_scale", [B + "dispatch_scale.py"] + sz(["--n", "100", "400"]), None),
        ("source_stream_limit", [B + "source_stream.py", "limit"] + sz(["--rows", "3000"]), None),
        ("source_stream_first_shard", [B + "source_stream.py", "first-shard"] + sz(["--rows", "20000"]), None),
        ("reward_dtype_drift", [B + "reward_dtype_drift.py", "--models", models] + sz(["--images", "16"]), None),
        ("rewards", [B + "rewards.py", "--models", models] + sz(["--images", "4", "--repeats", "2"]), None),
        ("vlm_stages", [B + "vlm_stages.py", *m] + sz(["--n", "2", "--batch-sizes", "1", "2", "--repeats", "2"]), None),
        ("image_stages", [B + "image_stages.py", *m] + sz(["--n", "2", "--steps", "2", "--batch-sizes", "1,2",
                                                          "--models", "sd15", "--repeats", "2"]), None),
        ("editors", [B + "editors.py", *m] + sz(["--editors", "instruct_pix2pix", "--n", "2",
                                                "--batch-sizes", "1,2", "--repeats", "2"]), None),
        ("filter_encodings", [B + "filter_encodings.py", *m] + sz(["--pairs", "4", "--repeats", "2"]), None),
        # its headline is a calculated count (deterministic): one repeat; its items/s are figures beside it
        ("served_vlm", [B + "served_vlm.py", *m] + sz(["--n", "2", "--concurrency", "1", "2", "--repeats", "1"]), None),
        ("overlap", [B + "overlap.py", *m] + sz(["--n", "8", "--batch", "4", "--repeats", "2"], ["--n", "64", "--batch", "16"]),
         None),
        ("rebuild", [B + "rebuild.py", "--models", models] + sz(["--limit", "4", "--num-samples", "2", "--repeats", "2"]),
         None),
        ("judges", [B + "judges.py", *m] + sz(["--n", "2", "--n-head", "2", "--sizes", "1,8", "--tokens", "4",
                                              "--rewards", "hpsv3,edit_score"]), None),
        ("schedule", [B + "schedule.py"] + sz(["--workers", "2", "--shards", "4", "--items", "2"]), None),
        ("dpo_step", [B + "dpo_step.py", "--diffusers-git", diffusers or ""]
         + sz(["--steps", "5", "--warmup", "1", "--rounds", "2"]),
         None if diffusers else "no --diffusers-git / DIFFUSERS_GIT (diffusers' example script)"),
        ("flow_dpo_step", [B + "flow_dpo_step.py", "--models", models] + sz(["--steps", "4", "--warmup", "1", "--repeats", "2"]),
         None),
        ("curate_resume", [B + "curate_runs.py", "resume", "--models", models] + sz(["--quick"]), None),
        ("memory", [B + "curate_runs.py", "memory", "--models", models] + sz(["--quick"]),
         None),
        ("doctor_projection", [B + "doctor_projection.py", *m] + sz(["--items", "4", "--run-items", "8", "--repeats", "2"]),
         HEAVY.format(2, "doctor_projection") if q else None),
        ("workers", [B + "reliability.py", "workers", "--models", models] + sz(["--items", "16", "--repeats", "2"]),
         HEAVY.format(2, "workers") if q else None),
        ("plan_heavy_shards", [B + "reliability.py", "plan", "--models", models] + sz(["--items", "16", "--repeats", "2"]),
         HEAVY.format("1 + 2", "plan_heavy_shards") if q else None),
        ("edit_candidates", [B + "edit_candidates.py", "--models", models]
         + sz(["--items", "4", "--num-edits", "1", "2", "--repeats", "2"]), HEAVY.format(3, "edit_candidates") if q else None),
        ("editor_cost", [B + "editor_cost.py"], GPU + ": each real editor's denoiser at its real size (up to 20B) in bfloat16"),
        ("gpu_check", ["bench/gpu_check.sh", "OUT", "16"], GPU + ": doctor on the tiny profiles (flow-matching ones too), "
         "curate --workers 2, a Flow-DPO fine-tune; then `bench/gpu_check_record.py OUT` here"),
        ("demo_budget", [B + "demo_budget.py"] + sz(["--no-test"]),
         "clones the repository and creates and installs a fresh venv (`make demo`, `make test`): tens of minutes"
         if q else None),
    ]
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: every benchmark, under 15 minutes")
    p.add_argument("--models-root", default=os.environ.get("RICHPREF_MODELS_ROOT", str(REPO / "data/models/tiny")))
    p.add_argument("--diffusers-git", default=os.environ.get("DIFFUSERS_GIT"))
    p.add_argument("--only", nargs="+", help="run only these benchmarks (names as --list prints them)")
    p.add_argument("--skip", nargs="+", default=[])
    p.add_argument("--list", action="store_true", help="print the plan (name, command, skipped why) and exit")
    p.add_argument("--no-report", action="store_true", help="do not regenerate docs/benchmarks.md")
    a = p.parse_args(argv)
    jobs = plan(a.quick, a.models_root, a.diffusers_git)
    names = [n for n, _, _ in jobs]
    unknown = [n for n in (a.only or []) + a.skip if n not in names]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; the benchmarks are: {', '.join(names)}")
    if a.list:
        for name, args, why in jobs:
            print(f"{name:28s} {'skipped: ' + why if why else ' '.join(args)}")
        return 0
    partial = bool(a.only or a.skip)
    chosen = [n for n in names if (not a.only or n in a.only) and n not in a.skip]
    # a partial run's record is named after its first benchmark, so runs of other benchmarks keep theirs
    tag = f"_partial_{chosen[0]}" + (f"+{len(chosen) - 1}" if len(chosen) > 1 else "") if partial and chosen else ""
    b = harness.Bench("run_all" + ("_quick" if a.quick else "") + tag, repeats=1)
    env = {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
           "HF_HUB_OFFLINE": "1", "RICHPREF_MODELS_ROOT": a.models_root}
    runs, failed, skipped, t_all = [], [], {}, time.perf_counter()
    for name, args, why in jobs:
        if (a.only and name not in a.only) or name in a.skip:
            continue
        if why and why.startswith(SLOW) and a.only:  # named: run it
            why = None
        if why:
            print(f"[run_all] {name}: skipped{' in --quick' if a.quick else ''}: {why}", flush=True)
            skipped[name] = why
            continue
        print(f"[run_all] {name}: {' '.join(args)}", flush=True)
        before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
        t0 = time.perf_counter()
        rc = subprocess.run([PY] + args if args[0].endswith(".py") else args, cwd=REPO, env=env).returncode
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        runs.append({"side": name, "repeat": 0, "wall_s": wall, "cpu_s": cpu, "rc": rc, "load_before": load,
                     "load_after": os.getloadavg()[0]})
        print(f"[run_all] {name}: exit {rc} after {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        if rc:
            failed.append(name)
    total = time.perf_counter() - t_all
    cpu_total = sum(r["cpu_s"] for r in runs)
    runs.append({"side": "total", "repeat": 0, "wall_s": total, "cpu_s": cpu_total})
    print("\n[run_all] benchmark                     wall s    CPU s  exit")
    for r in runs:
        print(f"[run_all] {r['side']:28s} {r['wall_s']:8.0f} {r['cpu_s']:8.0f}  {r.get('rc', '')}")
    for name, why in skipped.items():
        print(f"[run_all] {name:28s} skipped: {why}")
    goal = "< 900" if a.quick and not partial else None
    b.write(harness.headline("total.wall_s", total, "s", goal, skipped=skipped, failed=failed,
                             note=("wall time of every benchmark of the quick set, one after another" if a.quick else
                                   "wall time of every benchmark at full size, one after another")
                                  + ("; a partial run (--only / --skip)" if partial else "")
                                  + "; cpu_s: user + system seconds of each benchmark's processes"
                                  + (f"; failed: {', '.join(failed)}" if failed else "")), runs=runs)
    b.cleanup()
    if not a.no_report:
        subprocess.run([PY, B + "report.py"], cwd=REPO, env=env, check=True)
    print(f"[run_all] total {total:.0f} s wall, {cpu_total:.0f} s CPU; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
