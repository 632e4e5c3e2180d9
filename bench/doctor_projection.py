"""How close `richpref doctor`'s projection comes to a real run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/doctor_projection.py --models-root data/models/tiny \
        [--items 32] [--run-items 1024] [--repeats 3]

Writes `run-items` distinct prompts, asks `richpref doctor --items ITEMS --project-items RUN_ITEMS`
for the projected wall time of the tiny profile on them, then curates them for real
(`richpref curate`, a fresh run) and compares: projected / measured process wall (goal within ±25%),
and projected / measured flow wall (first shard start to last shard end, from the run's work log).
On the harness: the doctor and the curate run are fresh processes (own Prefect home and caches),
alternated per repeat; raw figures in bench/results/doctor_projection-<commit>.json.
"""
from __future__ import annotations

import argparse
import json
import sys

import harness

REPO = harness.REPO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-root", required=True)
    ap.add_argument("--items", type=int, default=32, help="items the doctor measures")
    ap.add_argument("--run-items", type=int, default=1024, help="items of the real run (and of the projection)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    b = harness.Bench("doctor_projection", args.repeats)
    prompts = b.tmp / "prompts.txt"
    prompts.write_text("".join(f"a photo of object number {i} on a wooden table\n" for i in range(args.run_items)))
    sets = ["--set", f"source.path={prompts}", "--models-root", args.models_root]
    cli = [sys.executable, "-m", "richpref.cli.commands"]

    def side(name: str, rep: int) -> dict:
        root, env = b.fresh(f"{name}-{rep}")
        if name == "doctor":
            table = root / "doctor.json"
            r = harness.run_process(cli + ["--data-dir", f"{root}/data", "doctor", "--profile", "tiny", "--items",
                                           str(args.items), "--project-items", str(args.run_items), "--json", str(table),
                                           *sets], env, cwd=str(REPO))
            assert r["rc"] == 0, r["stderr"][-3000:]
            projected = json.loads(table.read_text())["report"]["total"]["hours_per_worker"] * 3600
            return {"process_wall_s": r["wall_s"], "projected_s": projected}
        r = harness.run_process(cli + ["--data-dir", f"{root}/data", "curate", "--profile", "tiny", "--run", "projection",
                                       *sets], env, cwd=str(REPO))
        assert r["rc"] == 0, r["stderr"][-3000:]
        work = [json.loads(line) for line in (root / "data/runs/projection/_log/work.jsonl").read_text().splitlines()]
        starts = [w["at"] - w.get("wall_s", w["compute_s"]) for w in work]
        return {"process_wall_s": r["wall_s"], "flow_wall_s": max(w["at"] for w in work) - min(starts),
                "maxrss_mib": r["maxrss_mib"]}

    b.alternate(["doctor", "curate"], side)
    derived = harness.ratios(b.runs, ("doctor", "projected_s"), ("curate", "process_wall_s"), "projected_over_process_wall")
    for d, f in zip(derived, harness.ratios(b.runs, ("doctor", "projected_s"), ("curate", "flow_wall_s"), "x")):
        d["projected_over_flow_wall"] = f["x"]
    runs = b.runs + derived
    s = harness.summarize(runs)
    b.write(harness.headline("projected_over_process_wall", s["projected_over_process_wall"]["median"], "x",
                             "in [0.75, 1.25]",
                             note=f"`richpref doctor --items {args.items} --project-items {args.run_items}`'s projected "
                                  f"wall / the process wall of `richpref curate` on those {args.run_items} prompts (tiny "
                                  f"profile, fresh run); each side a fresh process, alternated"), runs=runs)
    b.cleanup()


if __name__ == "__main__":
    main()
