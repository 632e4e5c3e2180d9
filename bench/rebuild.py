"""Pairs per second of the rebuild pipeline (`pipeline: rebuild`) on the tiny models (CPU).

    python bench/rebuild.py [--models DIR] [--limit 8] [--num-samples 3] [--pairing all_with_margin] [--repeats 3]

Rebuilds the first `--limit` rows of the bundled Pick-a-Pic v2 no-images sample (distinct captions
after dedupe) into a fresh run per repeat, each repeat a fresh process (bench/harness.py), through the shard runner (richpref/recipes/inline.py,
no Prefect): source -> samples -> rewards -> ranked -> pairs. Prints the exported pairs, the wall time
(model loads included: a cold run), pairs/s, samples/s and each stage's compute seconds from the work
log; writes bench/results/rebuild-<commit>.json (on the harness: median and spread over the repeats).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import harness  # noqa: E402


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=os.environ.get("RICHPREF_MODELS_ROOT", str(REPO / "data/models/tiny")))
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--num-samples", type=int, default=3)
    ap.add_argument("--pairing", default="all_with_margin", choices=["all_with_margin", "best_vs_worst"])
    a = harness.child_args(ap, repeats=3).parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = [f"source.limit={a.limit}", f"sample.num_samples={a.num_samples}", f"relabel.pairing={a.pairing}"]
    if a.child:
        r = one_run(a.models, overrides)
        stages = r.pop("stage_compute_s")
        harness.print_child("RESULT ", {"rebuild": {**r, **{f"compute.{k}_s": v for k, v in stages.items()}}})
        return
    harness.run("rebuild", a.repeats, ["rebuild"], "rebuild.pairs_per_s", "pairs/s", script=__file__,
                args=harness.child_argv(sys.argv[1:]),
                note=f"`tiny-rebuild`, source.limit={a.limit}, {a.num_samples} samples per prompt, "
                     f"{a.pairing}; in process through the shard runner (no Prefect), a fresh process and "
                     f"run per repeat, model loads included (cold)")


if __name__ == "__main__":
    main()
