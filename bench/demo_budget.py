"""The walking skeleton's budgets, measured on a clean clone.

    python bench/demo_budget.py [--no-test] [--keep DIR]

Prints: `make demo` wall time from a clean clone (venv creation and install included), the curate
part alone for 32 prompts on an existing install (cold and warm cache), and `make test` wall time
from a clean clone. Goals: demo < 10 min, curate(32) < 3 min, test < 15 min.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: str, cwd: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-4000:])
        raise SystemExit(f"`{cmd}` failed with exit {proc.returncode}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-test", action="store_true", help="skip the clean-clone `make test`")
    ap.add_argument("--keep", help="clone into this dir and keep it")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="richpref-bench-"))
    if root.exists():
        shutil.rmtree(root)
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VIRTUAL_ENV"))}
    figures = {}
    figures["make demo (clean clone, install included)"] = timed("make demo", root, env)
    richpref = root / ".venv/bin/richpref"
    figures["curate 32 prompts, new run (models built, install done)"] = timed(
        f"{richpref} curate --profile tiny --run bench32 --set source.limit=32", root, env)
    figures["curate 32 prompts, same run again (all cached)"] = timed(
        f"{richpref} curate --profile tiny --run bench32 --set source.limit=32", root, env)
    if not args.no_test:
        test_root = Path(str(root) + "-test")
        if test_root.exists():
            shutil.rmtree(test_root)
        subprocess.run(["git", "clone", "-q", str(REPO), str(test_root)], check=True)
        figures["make test (clean clone, install included)"] = timed("make test", test_root, env)
        shutil.rmtree(test_root, ignore_errors=True)
    print(f"machine: {os.cpu_count()} cores; commit {subprocess.check_output(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, text=True).strip()}")
    for name, secs in figures.items():
        print(f"{name:<60} {secs:8.1f} s  ({secs / 60:.2f} min)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
