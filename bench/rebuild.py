"""Pairs per second of the rebuild pipeline (`pipeline: rebuild`) on the tiny models (CPU).

    python bench/rebuild.py [--models DIR] [--limit 8] [--num-samples 3] [--pairing all_with_margin] [--repeats 1]

Rebuilds the first `--limit` rows of the bundled Pick-a-Pic v2 no-images sample (distinct captions
after dedupe) into a fresh run per repeat, in this process through the shard runner (richpref/recipes/inline.py,
no Prefect): source -> samples -> rewards -> ranked -> pairs. Prints the exported pairs, the wall time
(model loads included: a cold run), pairs/s, samples/s and each stage's compute seconds from the work
log; writes bench/results/rebuild-<commit>.json (format: COMMON bench JSON).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def one_run(models: str, overrides: list[str]) -> dict:
    from richpref.recipes.inline import run_inline
    from richpref.models.runtime import resident
    from richpref.schemas.config import load_profile
    from richpref.run.storage import RunStore

    data = tempfile.mkdtemp(prefix="richpref-bench-rebuild-")
    prof = load_profile("tiny-rebuild", overrides, models_root=models)
    t0 = time.perf_counter()
    ms = run_inline(prof, data, "bench", report=False)
    wall = time.perf_counter() - t0
    resident.release()
    stages: dict[str, float] = {}
    for r in RunStore(data, "bench").read_log("work.jsonl"):
        stages[r["stage"]] = round(stages.get(r["stage"], 0.0) + r["compute_s"], 3)
    pairs = sum(m.rows for m in ms["pairs"].values())
    samples = sum(m.kept for m in ms["samples"].values())
    return {"pairs": pairs, "samples": samples, "prompts": sum(m.kept for m in ms["source"].values()),
            "wall_s": round(wall, 3), "pairs_per_s": pairs / wall, "samples_per_s": samples / wall,
            "stage_compute_s": stages}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=os.environ.get("RICHPREF_MODELS_ROOT", str(REPO / "data/models/tiny")))
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--num-samples", type=int, default=3)
    ap.add_argument("--pairing", default="all_with_margin", choices=["all_with_margin", "best_vs_worst"])
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = [f"source.limit={a.limit}", f"sample.num_samples={a.num_samples}", f"relabel.pairing={a.pairing}"]
    runs = []
    for i in range(a.repeats):
        r = one_run(a.models, overrides)
        runs.append({"side": "a", "repeat": i, **r})
        print(f"repeat {i}: {r['prompts']} prompts, {r['samples']} samples, {r['pairs']} pairs in {r['wall_s']:.1f} s "
              f"= {r['pairs_per_s']:.3f} pairs/s, {r['samples_per_s']:.3f} samples/s; stage compute s {r['stage_compute_s']}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()

    def stat(key):
        xs = sorted(r[key] for r in runs)
        return {"median": xs[len(xs) // 2], "min": xs[0], "max": xs[-1]}

    out = {"bench": "rebuild", "commit": commit, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"cpus": os.cpu_count(), "loadavg": list(os.getloadavg())},
           "command": " ".join(shlex.quote(x) for x in ["python", "bench/rebuild.py", *sys.argv[1:]]),
           "repeats": a.repeats, "runs": runs,
           "summary": {k: stat(k) for k in ("pairs_per_s", "samples_per_s", "wall_s", "pairs")},
           "headline": {"name": "rebuild pairs/s (tiny, CPU, cold: model loads included)",
                        "value": stat("pairs_per_s")["median"], "unit": "pairs/s", "goal": None, "met": None}}
    path = REPO / "bench" / "results" / f"rebuild-{commit}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
