"""Seconds per image of model compute and of the CPU work around it, in the sample, edit and cutout
stages, with the CPU work inline (RICHPREF_CPU_THREADS=0) and overlapped on a thread pool (2).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/overlap.py --models-root data/models/tiny [--n 64] [--batch 16] [--size 64] [--stages cutout]

Runs the stages' pure shard functions (sample_rows, edit_rows, cutout_rows) on `n` items at
`batch` items per model call, one size for every row. Each repeat is a fresh process (bench/harness.py:
own Prefect home and caches) that warms every stage up once, then runs it inline and overlapped in
alternated order (inline first in even repeats, overlapped first in odd ones); raw runs go to
bench/results/overlap-<commit>.json, the median and spread over repeats are printed. The model (torch, onnxruntime) gets one thread: on a GPU the
model's compute leaves the CPU cores free, and one core for the model and the rest for the pool is
the nearest a CPU machine comes to that. The goal: overlapped stage wall <= 1.10 x max(model, CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread for the model's runtime, torch and onnxruntime alike (rembg sizes its session from this):
# the model keeps one core, the pool gets the rest.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def _inputs(n: int, models_root: str, batch: int, size: int):
    from richpref.schemas.config import load_profile
    from richpref.schemas.tables import EDITS, INSTRUCTIONS, PROMPTS, rows_to_table
    from richpref.tasks.sample import load_generator, sample_rows

    sets = [f"{s}.batch_size={batch}" for s in ("sample", "edit", "cutout")] + [f"sample.height={size}", f"sample.width={size}"]
    profile = load_profile("tiny", sets, models_root)
    prompts = rows_to_table([{"item_id": f"i{i:04d}", "status": "ok", "reason": None, "source": "bench",
                              "source_row": i, "prompt": f"a photo of object number {i} on a table", "image": None}
                             for i in range(n)], PROMPTS)
    samples = sample_rows(prompts, profile.sample, lambda: load_generator(profile.sample, models_root)).to_pylist()
    instructions = rows_to_table([{"item_id": r["item_id"], "status": "ok", "reason": None, "prompt": r["prompt"],
                                   "instructions": ["make the object red", "add a blue sky"]} for r in samples],
                                 INSTRUCTIONS)
    return profile, prompts, samples, instructions, EDITS, rows_to_table


def child(args) -> None:
    """One repeat: every stage warmed up, then run once per side in the given order; prints RESULT json."""
    torch.set_num_threads(1)
    from richpref.common import overlap
    from richpref.models.runtime import resident
    from richpref.tasks.cutout import cutout_rows, load_remover
    from richpref.tasks.edit import edit_rows, load_editor
    from richpref.tasks.sample import load_generator, sample_rows

    root = args.models_root
    profile, prompts, samples, instructions, EDITS, rows_to_table = _inputs(args.n, root, args.batch, args.size)
    originals = [r["image"] for r in samples]
    edits = edit_rows(instructions, originals, profile.edit, lambda: load_editor(profile.edit, root)).to_pylist()
    edit_table = rows_to_table([{**r, "status": "ok"} for r in edits], EDITS).select(["item_id", "candidate"])
    edited = [r["image"] or originals[i] for i, r in enumerate(edits)]
    stages = {
        "sample": lambda: sample_rows(prompts, profile.sample, lambda: load_generator(profile.sample, root)),
        "edit": lambda: edit_rows(instructions, originals, profile.edit, lambda: load_editor(profile.edit, root)),
        "cutout": lambda: cutout_rows(edit_table, originals, edited, profile.cutout,
                                      lambda: load_remover(profile.cutout, root)),
    }
    out: dict[str, dict] = {side: {} for side in args.order}
    for name, run in ((k, v) for k, v in stages.items() if k in args.stages):
        run()  # warm-up: the model loads and its first batch pays one-time costs
        for side in args.order:
            os.environ["RICHPREF_CPU_THREADS"] = "0" if side == "inline" else str(args.threads)
            with overlap.measure() as st:
                run()
            out[side].update({f"{name}.wall_per_image": st.wall_s / args.n, f"{name}.model_per_image": st.model_s / args.n,
                              f"{name}.cpu_per_image": st.cpu_s / args.n})
        resident.release()
    os.environ.pop("RICHPREF_CPU_THREADS", None)
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-root", required=True, help="a tiny build (richpref models build-tiny DIR)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (edits and cut-outs follow the samples)")
    ap.add_argument("--threads", type=int, default=2, help="pool threads in the overlapped runs")
    ap.add_argument("--stages", nargs="+", default=["sample", "edit", "cutout"], choices=["sample", "edit", "cutout"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--order", nargs="+", default=["inline", "overlap"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import harness

    b = harness.Bench("overlap", args.repeats)
    runs = []
    for rep in range(args.repeats):
        order = [s for r, s in harness.alternation(["inline", "overlap"], args.repeats) if r == rep]
        root, env = b.fresh(f"rep{rep}", OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--child", "--models-root", args.models_root, "--n", str(args.n), "--batch",
               str(args.batch), "--size", str(args.size), "--threads", str(args.threads), "--stages", *args.stages,
               "--order", *order]
        r = harness.run_process(cmd, env, timeout=3600)
        assert r["rc"] == 0, r["stderr"][-3000:]
        res = harness.child_result(r["stdout"])
        for side in order:
            runs.append({"side": side, "repeat": rep, **res[side]})
        derived = {"side": "derived", "repeat": rep}
        for st in args.stages:
            inline, over = res["inline"], res["overlap"]
            peak = max(inline[f"{st}.model_per_image"], inline[f"{st}.cpu_per_image"])
            derived[f"{st}.overlap_over_max"] = over[f"{st}.wall_per_image"] / peak
            derived[f"{st}.inline_over_overlap"] = inline[f"{st}.wall_per_image"] / over[f"{st}.wall_per_image"]
        derived["worst_overlap_over_max"] = max(derived[f"{st}.overlap_over_max"] for st in args.stages)
        runs.append(derived)
        print(f"[overlap] repeat {rep} ({' then '.join(order)}): " + ", ".join(
            f"{k}={v:.3f}" for k, v in derived.items() if isinstance(v, float)), flush=True)
    s = harness.summarize(runs)
    b.write(harness.headline("worst_overlap_over_max", s["worst_overlap_over_max"]["median"], "x", "<= 1.10",
                             note=f"overlapped wall / max(model, CPU work) per image, the worst of {', '.join(args.stages)}; "
                                  f"{args.n} images of {args.size}x{args.size}, batch {args.batch}, one torch thread, "
                                  f"{args.threads} pool threads"), runs=runs)
    b.cleanup()

if __name__ == "__main__":
    main()
