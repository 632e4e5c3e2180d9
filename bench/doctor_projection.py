"""How close `richpref doctor`'s projection comes to a real run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/doctor_projection.py --models-root data/models/tiny \
        [--items 32] [--run-items 1024]

Writes `run-items` distinct prompts, asks `richpref doctor --items ITEMS --project-items RUN_ITEMS`
for the projected wall time of the tiny profile on them, then curates them for real
(`richpref curate`, a fresh run) and compares: projected / measured process wall (goal within ±25%),
and projected / measured flow wall (first shard start to last shard end, from the run's work log).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "richpref.cli.commands", *args], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-root", required=True)
    ap.add_argument("--items", type=int, default=32, help="items the doctor measures")
    ap.add_argument("--run-items", type=int, default=1024, help="items of the real run (and of the projection)")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="richpref-projection-") as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("".join(f"a photo of object number {i} on a wooden table\n" for i in range(args.run_items)))
        sets = ["--set", f"source.path={prompts}", "--models-root", args.models_root]
        table = Path(tmp) / "doctor.json"
        doctor_s = _cli(["--data-dir", f"{tmp}/doctor", "doctor", "--profile", "tiny", "--items", str(args.items),
                         "--project-items", str(args.run_items), "--json", str(table), *sets], env)
        projected = json.loads(table.read_text())["report"]["total"]["hours_per_worker"] * 3600
        run_s = _cli(["--data-dir", f"{tmp}/data", "curate", "--profile", "tiny", "--run", "projection", *sets], env)
        work = [json.loads(line) for line in (Path(tmp) / "data/runs/projection/_log/work.jsonl").read_text().splitlines()]
        starts = [w["at"] - w.get("wall_s", w["compute_s"]) for w in work]
        flow_s = max(w["at"] for w in work) - min(starts)
    print(f"doctor: {args.items} items measured in {doctor_s:.1f} s; projected wall for {args.run_items} items: "
          f"{projected:.1f} s")
    print(f"real run of {args.run_items} items: process wall {run_s:.1f} s, flow wall {flow_s:.1f} s")
    print(f"projected / process wall = {projected / run_s:.3f}; projected / flow wall = {projected / flow_s:.3f} "
          "(goal: within 0.75-1.25)")


if __name__ == "__main__":
    main()
