"""Precision and recall of the instruct stage's text guards on a corpus of realistic answers.

    .venv/bin/python bench/instruction_guards.py [--corpus tests/data/instruction_corpus.yaml]

Each answer of the corpus goes through `check_text` (parsing, no-edit answers, commentary,
vagueness, contradiction, grounding: everything that needs no model) under several settings; each
instruction the careful reader found is matched to the guard's decision. A drop is the positive
class: precision = the share of the guards' drops the reader also drops, recall = the share of the
reader's drops the guards make, "good kept" = the share of the reader's keeps the guards keep.
Instructions about things the image does not show (`not_visible`) need the image: the text guards
cannot see them, so the figures are given with and without them, and for them the table shows
whether the visibility question would name the right target.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from richpref.schemas.config import InstructConfig
from richpref.tasks.instruct import check_text
from richpref.tasks.vlm_text import instruction_target

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "instruction_corpus.yaml"
# The second held-out set (issue 26): frozen, its sha256 committed before it was first scored.
HELDOUT = Path(__file__).resolve().parent / "data" / "instruction_heldout.yaml"
HELDOUT_SHA256 = HELDOUT.with_suffix(".sha256")
# The reader's reason -> the guard's reject code that states the same.
SAME_REASON = {"contradicts_prompt": "contradicts_prompt", "stray_content": "ungrounded",
               "vague_instruction": "vague_instruction", "commentary": "commentary",
               "no_edit_needed": "no_edit_needed", "not_visible": "not_visible"}
# Settings compared: the defaults before the corpus existed, single guards, and a grounding sweep.
SETTINGS = {
    "old defaults (grounding 0.5, no contradiction check)": dict(min_grounding=0.5, drop_contradictions=False),
    "contradiction only": dict(min_grounding=0.0, drop_contradictions=True),
    "contradiction + grounding 0.1 (new defaults)": {},
    "contradiction + grounding 0.2": dict(min_grounding=0.2),
    "contradiction + grounding 0.34": dict(min_grounding=0.34),
    "contradiction + grounding 0.5": dict(min_grounding=0.5),
}


def load_corpus(path: Path = CORPUS) -> list[dict]:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass
class Decision:
    entry: str
    text: str
    want: str  # "keep" or the reader's reason
    got: str  # "keep" or the guard's reason code ("unparsed" when the parser did not produce it)
    split: str


def decide(corpus: list[dict], cfg: InstructConfig) -> list[Decision]:
    """The guard's decision for every instruction of the corpus."""
    out = []
    for e in corpus:
        c = check_text(e["answer"], True, e["prompt"], e["critique"], cfg)
        verdict = {_norm(s): "keep" for s in c.items}
        verdict.update({_norm(s): r.split(":")[0] for s, r in zip(c.dropped, c.reasons)})
        for ins in e["instructions"]:
            got = c.reject.split(":")[0] if c.reject else verdict.get(_norm(ins["text"]), "unparsed")
            out.append(Decision(e["id"], ins["text"], ins.get("drop", "keep"), got, e.get("split", "tuning")))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % at z = 1.96) of a proportion k / n; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def scores(decisions: list[Decision], include_not_visible: bool = True) -> dict:
    """Confusion counts over the instructions the parser produced; an instruction the parser did not
    produce ("unparsed") is counted apart, neither kept nor dropped."""
    ds = [d for d in decisions if include_not_visible or d.want != "not_visible"]
    unparsed = sum(d.got == "unparsed" for d in ds)
    ds = [d for d in ds if d.got != "unparsed"]
    tp = sum(d.want != "keep" and d.got != "keep" for d in ds)
    fp = sum(d.want == "keep" and d.got != "keep" for d in ds)
    fn = sum(d.want != "keep" and d.got == "keep" for d in ds)
    tn = sum(d.want == "keep" and d.got == "keep" for d in ds)
    same = sum(d.want != "keep" and SAME_REASON.get(d.want) == d.got for d in ds)
    return {"n": len(ds), "unparsed": unparsed, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
            "good_kept": tn / (tn + fp) if tn + fp else 1.0, "same_reason": same / (tp + fn) if tp + fn else 1.0,
            "precision_ci": wilson(tp, tp + fp), "recall_ci": wilson(tp, tp + fn), "good_kept_ci": wilson(tn, tn + fp)}


def frozen_heldout(path: Path = HELDOUT) -> list[dict]:
    """The second held-out set, refused if its bytes are not the ones frozen before it was first scored."""
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    want = HELDOUT_SHA256.read_text().split()[0]
    if digest != want:
        raise SystemExit(f"{path} changed since it was frozen (sha256 {digest}, frozen {want}): a held-out set "
                         "is scored as written; add new instructions to a new file instead")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def target_hits(corpus: list[dict]) -> tuple[int, int]:
    """(instructions whose visibility question names the reader's target, instructions with a target)."""
    wanted = [i for e in corpus for i in e["instructions"] if i.get("target")]
    return sum(instruction_target(i["text"]) == i["target"] for i in wanted), len(wanted)


def _ci(a: dict, key: str) -> str:
    lo, hi = a[key + "_ci"]
    return f"[{lo:.2f}, {hi:.2f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--show", action="store_true", help="list the disagreements of the new defaults")
    p.add_argument("--no-record", action="store_true", help="do not write bench/results/instruction_guards-*.json")
    args = p.parse_args(argv)
    corpus = load_corpus(args.corpus) + frozen_heldout()
    splits = sorted({e.get("split", "tuning") for e in corpus}, key=lambda s: (s != "tuning", s))
    runs, head = [], None
    for split in splits:
        part = [e for e in corpus if e.get("split", "tuning") == split]
        n_ins = sum(len(e["instructions"]) for e in part)
        print(f"\n{split}: {len(part)} answers, {n_ins} instructions")
        print("| setting | precision [95% CI] | recall [95% CI] | recall w/o not_visible | good kept [95% CI] | "
              "same reason | unparsed |")
        print("|---|---|---|---|---|---|---|")
        for name, overrides in SETTINGS.items():
            ds = decide(part, InstructConfig(**overrides))
            a, b = scores(ds), scores(ds, include_not_visible=False)
            print(f"| {name} | {a['precision']:.2f} ({a['tp']}/{a['tp'] + a['fp']}) {_ci(a, 'precision')} | "
                  f"{a['recall']:.2f} ({a['tp']}/{a['tp'] + a['fn']}) {_ci(a, 'recall')} | {b['recall']:.2f} "
                  f"({b['tp']}/{b['tp'] + b['fn']}) | {a['good_kept']:.2f} ({a['tn']}/{a['tn'] + a['fp']}) "
                  f"{_ci(a, 'good_kept')} | {a['same_reason']:.2f} | {a['unparsed']} |")
            if "new defaults" in name:
                runs.append({"side": split, "repeat": 0, "instructions": n_ins, "unparsed": a["unparsed"],
                             "precision": a["precision"], "precision_lo": a["precision_ci"][0], "precision_hi": a["precision_ci"][1],
                             "recall": a["recall"], "recall_lo": a["recall_ci"][0], "recall_hi": a["recall_ci"][1],
                             "good_kept": a["good_kept"], "good_kept_lo": a["good_kept_ci"][0],
                             "good_kept_hi": a["good_kept_ci"][1], "tp": a["tp"], "fp": a["fp"], "fn": a["fn"], "tn": a["tn"]})
                if split == "held_out_2":
                    head = a
        hits, total = target_hits(part)
        print(f"visibility targets named right: {hits}/{total}")
        if args.show:
            for d in decide(part, InstructConfig()):
                if (d.want == "keep") != (d.got == "keep") or d.got == "unparsed":
                    print(f"  {d.entry}: reader {d.want}, guards {d.got}: {d.text}")
    if not args.no_record and head is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import harness

        b = harness.Bench("instruction_guards", repeats=1)
        lo, hi = head["precision_ci"]
        b.write(harness.headline("held_out_2.precision", head["precision"], "", None,
                                 note=f"new defaults on the frozen held-out set (bench/data/instruction_heldout.yaml, "
                                      f"sha256 {HELDOUT_SHA256.read_text().split()[0][:12]}): precision "
                                      f"{head['precision']:.2f} [{lo:.2f}, {hi:.2f}], recall {head['recall']:.2f} "
                                      f"[{head['recall_ci'][0]:.2f}, {head['recall_ci'][1]:.2f}], good kept "
                                      f"{head['good_kept']:.2f} [{head['good_kept_ci'][0]:.2f}, {head['good_kept_ci'][1]:.2f}] "
                                      f"(Wilson 95 %), {head['unparsed']} unparsed apart; deterministic, so N = 1"),
                runs=runs)
        b.cleanup()
    return 0

if __name__ == "__main__":
    sys.exit(main())
