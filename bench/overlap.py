"""Seconds per image of model compute and of the CPU work around it, in the sample, edit and cutout
stages, with the CPU work inline (RICHPREF_CPU_THREADS=0) and overlapped on a thread pool (2).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/overlap.py --models-root data/models/tiny [--n 64] [--batch 16] [--size 64] [--stages cutout]

Runs the stages' pure shard functions (sample_rows, edit_rows, cutout_rows) on `n` items at
`batch` items per model call, best of `repeats` after a warm-up. The model (torch, onnxruntime) gets one thread: on a GPU the
model's compute leaves the CPU cores free, and one core for the model and the rest for the pool is
the nearest a CPU machine comes to that. The goal: overlapped stage wall <= 1.10 x max(model, CPU).
"""
from __future__ import annotations

import argparse
import os

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-root", required=True, help="a tiny build (richpref models build-tiny DIR)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (edits and cut-outs follow the samples)")
    ap.add_argument("--threads", type=int, default=2, help="pool threads in the overlapped runs")
    ap.add_argument("--stages", nargs="+", default=["sample", "edit", "cutout"], choices=["sample", "edit", "cutout"])
    args = ap.parse_args()
    torch.set_num_threads(1)

    from richpref import overlap
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
    print(f"# torch {torch.__version__}, 1 torch thread; n={args.n} items of {args.size}x{args.size}, batch {args.batch}, "
          f"best of {args.repeats}; "
          "seconds per image")
    print(f"{'stage':7} {'model':>8} {'CPU':>8} {'inline wall':>12} {'overlap wall':>13} {'max(m,CPU)':>11} "
          f"{'overlap/max':>12} {'inline/overlap':>15}")
    for name, run in ((k, v) for k, v in stages.items() if k in args.stages):
        run()  # warm-up: the model loads and its first batch pays one-time costs
        best = {}
        for threads in (0, args.threads):
            os.environ["RICHPREF_CPU_THREADS"] = str(threads)
            runs = []
            for _ in range(args.repeats):
                with overlap.measure() as stats:
                    run()
                runs.append(stats)
            best[threads] = min(runs, key=lambda s: s.wall_s)
        inline, over = best[0], best[args.threads]
        n = args.n
        model, cpu = inline.model_s / n, inline.cpu_s / n
        peak = max(model, cpu)
        print(f"{name:7} {model:8.4f} {cpu:8.4f} {inline.wall_s / n:12.4f} {over.wall_s / n:13.4f} {peak:11.4f} "
              f"{over.wall_s / n / peak:12.3f} {inline.wall_s / over.wall_s:15.3f}", flush=True)
        resident.release()
    os.environ.pop("RICHPREF_CPU_THREADS", None)


if __name__ == "__main__":
    main()
