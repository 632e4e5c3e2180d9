"""What several edit candidates per item cost, stage by stage.

    python bench/edit_candidates.py --items 32 --num-edits 1 2 4 [--pairing best_vs_worst]

Curates the bundled prompts (repeated to N items) once, then re-runs the same run with each
`edit.num_edits`: sample, critique and instruct are cached, so each run computes only edit, cutout,
check, filter, score, relabel and export. Prints each stage's compute seconds (from the work log), seconds per
edit candidate, and the pairs exported. An item's original is cut out, attribute-listed and scored
once whatever its number of edits, so cutout, filter and relabel grow slower than the candidates.
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
BIN = Path(sys.executable).parent
PROMPTS = (REPO / "richpref/data/demo_prompts.txt").read_text().splitlines()
STAGES = ("edit", "cutout", "check", "filter", "score", "relabel", "export")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--num-edits", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--pairing", default="best_vs_original", choices=["best_vs_original", "best_vs_worst"])
    ap.add_argument("--models", default=str(REPO / "data/models/tiny"))
    a = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="richpref-bench-"))
    src = data / "prompts.jsonl"
    src.write_text("".join(json.dumps({"caption": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}) + "\n" for i in range(a.items)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(data / ".prefect")}
    env.pop("RICHPREF_FAULTS", None)
    log = data / "runs" / "cands" / "_log" / "work.jsonl"
    print(f"{a.items} items, pairing {a.pairing}; stage compute seconds (per edit candidate)")
    print(f"{'num_edits':>9} " + " ".join(f"{s:>16}" for s in STAGES) + f" {'pairs':>6} {'wall':>7}")
    for k in a.num_edits:
        seen = len(log.read_text().splitlines()) if log.exists() else 0
        cmd = [str(BIN / "richpref"), "--data-dir", str(data), "curate", "--run", "cands", "--models-root", a.models,
               "--set", "source.kind=jsonl", "--set", f"source.path={src}", "--set", "source.shard_size=32",
               "--set", f"edit.num_edits={k}", "--set", f"relabel.pairing={a.pairing}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stdout.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"curate with num_edits={k} failed")
        recs = [json.loads(x) for x in log.read_text().splitlines()[seen:] if x.strip()]
        secs = {s: sum(r["compute_s"] for r in recs if r["stage"] == s) for s in STAGES}
        candidates = sum(r["rows"] for r in recs if r["stage"] == "edit")
        pairs = sum(r["rows"] for r in recs if r["stage"] == "export")
        cells = " ".join(f"{secs[s]:>7.1f} ({secs[s] / max(candidates, 1):.3f})" for s in STAGES)
        print(f"{k:>9} {cells} {pairs:>6} {wall:>6.1f}s")


if __name__ == "__main__":
    main()
