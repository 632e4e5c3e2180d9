"""Diffusion-DPO train step time: richpref's trainer vs the diffusers example script, same model and batch.

Both train LoRA (rank 4, the only mode the example script has) on the tiny SD 1.5 from the same
Pick-a-Pic-format Parquet file: 2 pairs per step, 64 px, fp32, one process, β 5000 (the example's
--beta_dpo 2500 without the ½ is the same objective), constant lr, no checkpoints. Each trainer runs
in its own fresh interpreter with the same thread count (--threads); a step's time is the interval between two consecutive optimizer-step
completions (data loading, VAE and text encoding included), taken from the example's progress-bar
updates and from richpref's metrics.jsonl. The first `--warmup` steps are dropped. Each run is a fresh
process with its own caches and Prefect home (bench/harness.py); the two sides alternate (example first
in even rounds, richpref first in odd ones). Every dataloader starts outside the timed window: the first
interval starts at the first step's end, and the file holds at least (steps + 1) batches, so no epoch
ends (and no dataloader restarts) inside a run.

The example script is not part of this project: give its path (`--reference-script`), or a diffusers
git checkout or mirror (`--diffusers-git`, the file is read with `git show` into a temp dir). It
imports `wandb` at the top for its validation images; the benchmark never validates, so an empty
stand-in module is registered when wandb is not installed.

    .venv/bin/python bench/dpo_step.py --diffusers-git /path/to/diffusers [--steps 40 --rounds 3]

Prints per-round figures, then the ratio richpref / example (goal: ≤ 1.0) of each round's medians
(median and spread over rounds: the headline) and of the pooled medians and 10th percentiles; raw runs
go to bench/results/dpo_step-<commit>.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/research_projects/diffusion_dpo/train_diffusion_dpo.py"


def write_pairs(path: Path, n: int, size: int = 64, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)

    def png() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"caption": [f"a photo of object {i}" for i in range(n)],
                             "jpg_0": [png() for _ in range(n)], "jpg_1": [png() for _ in range(n)],
                             "label_0": [i % 2 for i in range(n)]}), path)


def run_richpref(model: str, data: str, out: str, steps: int) -> list[float]:
    from richpref.schemas.training import FinetuneConfig
    from richpref.training.train import METRICS, train

    cfg = FinetuneConfig(model=model, mode="lora", data=[{"path": data}], resolution=64, train_batch_size=2,
                         max_train_steps=steps, learning_rate=1e-5, scale_lr=False, lr_scheduler="constant",
                         lr_warmup_steps=0, checkpointing_steps=10**9, beta=5000, seed=0, vae_encode_batch_size=8)
    train(cfg, out)
    return [json.loads(line)["time"] for line in open(Path(out) / METRICS)]


def run_example(script: str, model: str, data_dir: str, out: str, steps: int) -> list[float]:
    stamps: list[float] = []

    class StepClock:  # stands in for tqdm: records when each optimizer step completes
        def __init__(self, *args, **kwargs) -> None:
            pass

        def update(self, n: int = 1) -> None:
            stamps.append(time.time())

        def set_postfix(self, **kwargs) -> None:
            pass

    if importlib.util.find_spec("wandb") is None:
        # Let the libraries decide "wandb unavailable" before the stand-in exists.
        import accelerate.tracking  # noqa: F401
        import datasets  # noqa: F401
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401

        sys.modules["wandb"] = types.ModuleType("wandb")
    spec = importlib.util.spec_from_file_location("diffusers_dpo_example", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.tqdm = StepClock
    args = module.parse_args([
        "--pretrained_model_name_or_path", model, "--dataset_name", data_dir, "--dataset_split_name", "train",
        "--output_dir", out, "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps),
        "--learning_rate", "1e-5", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", "4",
        "--beta_dpo", "2500", "--checkpointing_steps", str(10**9), "--seed", "0", "--mixed_precision", "no",
    ])
    module.main(args)
    return stamps


def step_times(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])][warmup:]


def worker(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "richpref":
            stamps = run_richpref(args.model, str(Path(args.data) / "pairs.parquet"), tmp, args.steps)
        else:
            stamps = run_example(args.reference_script, args.model, args.data, tmp, args.steps)
    print("RESULT " + json.dumps(step_times(stamps, args.warmup)))


def reference_script(args: argparse.Namespace, tmp: Path) -> str:
    if args.reference_script:
        return args.reference_script
    if not args.diffusers_git:
        sys.exit("give --reference-script PATH or --diffusers-git DIR (a diffusers checkout or mirror)")
    text = subprocess.run(["git", f"--git-dir={args.diffusers_git}", "show", f"HEAD:{EXAMPLE}"], check=True,
                          capture_output=True, text=True).stdout
    path = tmp / "train_diffusion_dpo.py"
    path.write_text(text)
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference-script", help="path to diffusers' train_diffusion_dpo.py")
    p.add_argument("--diffusers-git", help="a diffusers git dir; the example is read from its HEAD")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (1: least sensitive to other load on a shared machine)")
    p.add_argument("--worker", choices=["richpref", "example"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import harness

    bench = harness.Bench("dpo_step", args.rounds)
    pairs = max(args.pairs, 2 * (args.steps + 1))  # no epoch ends inside a run: no dataloader restart timed
    try:
        tmp = bench.tmp
        script = reference_script(args, tmp)
        from richpref.models.tiny.diffusion import build_tiny_sd15

        model = str(build_tiny_sd15(tmp / "sd15"))
        write_pairs(tmp / "data" / "pairs.parquet", pairs)
        pooled: dict[str, list[float]] = {"richpref": [], "example": []}

        def side(name: str, r: int) -> dict:
            root, env = bench.fresh(f"{name}{r}", OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            cmd = [sys.executable, __file__, "--worker", name, "--model", model, "--data", str(tmp / "data"),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--reference-script", script]
            proc = harness.run_process(cmd, env, timeout=3600, cwd=str(root))
            lines = [l for l in proc["stdout"].splitlines() if l.startswith("RESULT ")]
            if proc["rc"] != 0 or not lines:
                sys.exit(f"{name} run failed (exit {proc['rc']}):\n{proc['stderr'][-3000:]}")
            times = json.loads(lines[-1][len("RESULT "):])
            pooled[name] += times
            return {"median_ms": statistics.median(times) * 1000, "p10_ms": percentile(times, 10) * 1000,
                    "steps_timed": len(times), "process_wall_s": proc["wall_s"], "maxrss_mib": proc["maxrss_mib"]}

        runs = bench.alternate(["example", "richpref"], side)
        rat = harness.ratios(runs, ("richpref", "median_ms"), ("example", "median_ms"), "ratio_of_medians")
        print()
        for label, stat in (("median", statistics.median), ("p10", lambda t: percentile(t, 10))):
            ours, theirs = stat(pooled["richpref"]), stat(pooled["example"])
            print(f"pooled {label:6s}: richpref {ours * 1000:.1f} ms/step, diffusers example {theirs * 1000:.1f} ms/step, "
                  f"ratio {ours / theirs:.3f} (goal <= 1.0)")
        s = harness.summarize(rat)
        bench.write(harness.headline("ratio_of_medians", s["ratio_of_medians"]["median"], "x", "<= 1.0",
                                     note=f"richpref / diffusers example, ms per optimizer step (median of a run's steps), "
                                          f"tiny SD1.5 LoRA rank 4, 2 pairs per step, 64 px, {args.steps} steps, first "
                                          f"{args.warmup} dropped, {args.threads} torch thread(s)"),
                    runs=runs + rat)
    finally:
        bench.cleanup()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

if __name__ == "__main__":
    main()
