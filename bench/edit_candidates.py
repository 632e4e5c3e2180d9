"""What several edit candidates per item cost, stage by stage.

    python bench/edit_candidates.py --items 32 --num-edits 1 2 4 [--pairing best_vs_worst] [--repeats 3]

Curates the bundled prompts (repeated to N items) once, then re-runs the same run with each
`edit.num_edits`: sample, critique and instruct are cached, so each run computes only edit, cutout,
check, filter, score, relabel and export. Records each stage's compute seconds (from the work log),
seconds per edit candidate, and the pairs exported. On the harness: per repeat a fresh run (curated
up to instruct), then each num_edits a fresh process, in alternated order; raw runs in
bench/results/edit_candidates-<commit>.json. An item's original is cut out, attribute-listed and scored
once whatever its number of edits, so cutout, filter and relabel grow slower than the candidates.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness

REPO = harness.REPO
BIN = Path(sys.executable).parent
PROMPTS = (REPO / "richpref/data/demo_prompts.txt").read_text().splitlines()
STAGES = ("edit", "cutout", "check", "filter", "score", "relabel", "export")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--num-edits", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--pairing", default="best_vs_original", choices=["best_vs_original", "best_vs_worst"])
    ap.add_argument("--models", default=str(REPO / "data/models/tiny"))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    b = harness.Bench("edit_candidates", a.repeats)
    src = b.tmp / "prompts.jsonl"
    src.write_text("".join(json.dumps({"caption": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}) + "\n" for i in range(a.items)))
    datas: dict[int, Path] = {}

    def curate(data: Path, env: dict, extra: list[str]) -> dict:
        cmd = [str(BIN / "richpref"), "--data-dir", str(data), "curate", "--run", "cands", "--models-root", a.models,
               "--set", "source.kind=jsonl", "--set", f"source.path={src}", "--set", "source.shard_size=32", *extra]
        r = harness.run_process(cmd, env, timeout=7200)
        if r["rc"] != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r['stderr'][-3000:]}")
        return r

    def side(k: str, rep: int) -> dict:
        if rep not in datas:  # the repeat's run: sample, critique and instruct once, cached for every side
            datas[rep], env = b.fresh(f"rep{rep}")
            curate(datas[rep], env, ["--until", "instruct"])
        data = datas[rep]
        _, env = b.fresh(f"{k}-{rep}", PREFECT_HOME=str(data / ".prefect"))
        log = data / "runs" / "cands" / "_log" / "work.jsonl"
        seen = len(log.read_text().splitlines()) if log.exists() else 0
        r = curate(data, env, ["--set", f"edit.num_edits={k[1:]}", "--set", f"relabel.pairing={a.pairing}"])
        recs = [json.loads(x) for x in log.read_text().splitlines()[seen:] if x.strip()]
        secs = {st: sum(x["compute_s"] for x in recs if x["stage"] == st) for st in STAGES}
        cands = sum(x["rows"] for x in recs if x["stage"] == "edit")
        return {**{f"{st}_s": v for st, v in secs.items()}, "candidates": cands,
                "compute_per_candidate_s": sum(secs.values()) / max(cands, 1),
                "pairs": sum(x["rows"] for x in recs if x["stage"] == "export"), "wall_s": r["wall_s"]}

    sides = [f"k{k}" for k in a.num_edits]
    b.alternate(sides, side)
    name = f"{sides[-1]}_over_{sides[0]}_per_candidate"
    runs = b.runs + harness.ratios(b.runs, (sides[-1], "compute_per_candidate_s"), (sides[0], "compute_per_candidate_s"), name)
    s = harness.summarize(runs)
    b.write(harness.headline(name, s[name]["median"], "x", None,
                             note=f"compute seconds of edit..export per edit candidate at num_edits={a.num_edits[-1]} / "
                                  f"at num_edits={a.num_edits[0]} ({a.items} items, {a.pairing}); below 1: the "
                                  f"original's cut-out, attributes and score are shared by its candidates; each "
                                  f"num_edits a fresh process on the repeat's run (sample..instruct cached), alternated"),
            runs=runs)
    b.cleanup()


if __name__ == "__main__":
    main()
