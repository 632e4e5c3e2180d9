"""The raw figures of a bench/gpu_check.sh run, on the harness's format: bench/results/gpu_check-<commit>.json.

    python bench/gpu_check_record.py OUT_DIR [--commit SHA] [--command "..."]

Reads what the script left in OUT_DIR (gpu_check.log, doctor-<profile>.json, metrics.jsonl) after it
came back from the GPU machine; the machine facts (GPU, torch, CPUs) are the ones the script logged
there, not this machine's. One run per step (wall, exit code), one per doctor profile (hours per
worker for 100k items, items/s per stage) and the fine-tune's last step and held-out figures.
Headline: the script's whole wall (every step), with the number of steps that exited 0.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

STEP = re.compile(r"^== (?P<name>.+): rc=(?P<rc>\d+) wall=(?P<wall>[0-9.]+)s$")


def machine_facts(log: list[str]) -> dict:
    """GPU, torch and CPU count as gpu_check.sh logged them on its machine."""
    facts: dict = {}
    for i, line in enumerate(log[:12]):
        if line.startswith("name, memory.total") and i + 1 < len(log):
            gpu = [p.strip() for p in log[i + 1].split(",")]
            facts.update(gpu=gpu[0], gpu_memory=gpu[1] if len(gpu) > 1 else None, driver=gpu[2] if len(gpu) > 2 else None)
        elif line.startswith("torch "):
            words = line.split()
            facts.update({k: v for k, v in zip(words[::2], words[1::2]) if k in ("torch", "transformers", "diffusers", "prefect")})
        elif line.strip().isdigit():
            facts["cpus"] = int(line)
    return facts


def collect(out: Path) -> tuple[list[dict], dict]:
    log = (out / "gpu_check.log").read_text().splitlines()
    runs = [{"side": f"step {m['name']}", "repeat": 0, "wall_s": float(m["wall"]), "rc": int(m["rc"])}
            for m in map(STEP.match, log) if m]
    for f in sorted(out.glob("doctor-*.json")):
        rep = json.loads(f.read_text())["report"]
        # load seconds too: the tables the affinity plan and bench/schedule.py weigh (richpref/run/affinity.py)
        runs.append({"side": f.stem, "repeat": 0, "hours_per_worker": rep["total"]["hours_per_worker"],
                     "start_s": rep.get("start_s", 0.0),
                     **{f"{s['stage']}.items_per_s": s["items_per_s"] for s in rep.get("stages", [])},
                     **{f"{s['stage']}.load_s": s["load_s"] for s in rep.get("stages", [])}})
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = [r for r in rows if "loss" in r]
        held = [r for r in rows if r.get("kind") == "heldout"]
        if train:
            last = train[-1]
            runs.append({"side": "finetune", "repeat": 0, "steps": last["step"], "loss": last["loss"],
                         "step_seconds_median": harness.median([r["step_seconds"] for r in train]),
                         **({"heldout_implicit_acc": held[-1]["heldout_implicit_acc"]} if held else {})})
    return runs, machine_facts(log)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--commit", default=None, help="the commit the script ran at (default: this checkout's HEAD)")
    ap.add_argument("--command", default="bench/gpu_check.sh OUT 16")
    ap.add_argument("--results", type=Path, default=harness.RESULTS)
    args = ap.parse_args()
    runs, facts = collect(args.out)
    steps = [r for r in runs if r["side"].startswith("step ")]
    ok = sum(r["rc"] == 0 for r in steps)
    head = harness.headline("gpu_check.wall_s", sum(r["wall_s"] for r in steps), "s", None,
                            note=f"{ok} of {len(steps)} steps exited 0; build-tiny, doctor (2 workers, 16 items, "
                                 "bfloat16) on tiny-flux, tiny, tiny-sd3, tiny-qwen-image, curate tiny-flux "
                                 "--workers 2, a 4-step Flow-DPO LoRA fine-tune; one trial")
    rec = harness.result("gpu_check", args.commit or harness.commit(), facts, args.command, 1, runs, head)
    path = args.results / f"gpu_check-{rec['commit']}.json"
    path.write_text(json.dumps(rec, indent=1) + "\n")
    print(harness.format_summary(rec["summary"]))
    print(f"wrote {path}")
    return 0 if ok == len(steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
