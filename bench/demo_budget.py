"""The walking skeleton's budgets, measured on a clean clone.

    python bench/demo_budget.py [--no-test] [--keep DIR]

Prints: `make demo` wall time from a clean clone (venv creation and install included), the curate
part alone for 32 prompts on an existing install (cold and warm cache), and `make test` wall time
from a clean clone. Goals: demo < 10 min, curate(32) < 3 min, test < 15 min. On the harness (one trial
each, fresh Prefect home and caches): bench/results/demo_budget-<commit>.json.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import harness

REPO = harness.REPO


def timed(cmd: str, cwd: Path, env: dict) -> dict:
    r = harness.run_process(["bash", "-c", cmd], env, timeout=7200, cwd=str(cwd))
    if r["rc"] != 0:
        sys.stdout.write(r["stdout"][-4000:] + r["stderr"][-4000:])
        raise SystemExit(f"`{cmd}` failed with exit {r['rc']}")
    return {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-test", action="store_true", help="skip the clean-clone `make test`")
    ap.add_argument("--keep", help="clone into this dir and keep it")
    args = ap.parse_args()
    b = harness.Bench("demo_budget", 1)
    root = Path(args.keep) if args.keep else b.tmp / "clone"
    if root.exists():
        shutil.rmtree(root)
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    _, env = b.fresh("env")
    env = {k: v for k, v in env.items() if not k.startswith("VIRTUAL_ENV") and k != "PYTHONPATH"}
    richpref = root / ".venv/bin/richpref"
    curate = f"{richpref} curate --profile tiny --run bench32 --set source.limit=32"
    steps = [("make_demo", "make demo"), ("curate32_new", curate), ("curate32_again", curate)]
    if not args.no_test:
        test_root = Path(str(root) + "-test")
        if test_root.exists():
            shutil.rmtree(test_root)
        subprocess.run(["git", "clone", "-q", str(REPO), str(test_root)], check=True)
    runs = []
    for name, cmd in steps + ([] if args.no_test else [("make_test", "make test")]):
        figures = timed(cmd, test_root if name == "make_test" else root, env)
        runs.append({"side": name, "repeat": 0, **figures})
        print(f"{name:<16} {figures['wall_s']:8.1f} s  ({figures['wall_s'] / 60:.2f} min)", flush=True)
    if not args.no_test:
        shutil.rmtree(test_root, ignore_errors=True)
    s = harness.summarize(runs)
    b.write(harness.headline("make_demo.wall_s", s["make_demo.wall_s"]["median"], "s", "< 600",
                             note="`make demo` from a clean clone (venv creation and install included); goals also: "
                                  "curate of 32 prompts on that install < 180 s (curate32_new), `make test` from a clean "
                                  "clone < 900 s (make_test); one trial each"), runs=runs)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    b.cleanup()


if __name__ == "__main__":
    main()
