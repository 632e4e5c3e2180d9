"""Flow-DPO train step: richpref's trainer vs a minimal reference loop on the same tiny transformer, and
cached text embeddings vs encoding the captions every step.

Three workers, each in a fresh interpreter with one torch thread, train a LoRA (rank 4) on the tiny
FLUX.1 twin from the same Pick-a-Pic-format Parquet (2 pairs per step, 64 px, fp32, β 2000, constant
lr, no checkpoints, no held-out split):

- `richpref`: `richpref.training.train.train` (text embeddings cached before training; its step
  includes data decoding, the VAE, reference and policy passes, backward, AdamW).
- `loop`: a minimal loop written here the way the reference scripts do it (flow_grpo's
  train_sd3_dpo.py, diffusers' train_dreambooth_lora_flux.py): the pipeline loaded whole, LoRA added,
  captions encoded once before the loop; per step: decode the pair, VAE encode, one ε and σ per pair,
  reference pass with the adapters disabled (`disable_adapters`), policy pass, loss, backward, AdamW.
- `loop-encode`: the same loop encoding the captions with the text encoders every step.

Fair by construction: every run is a fresh interpreter that first imports the same modules (richpref's
trainer, accelerate, datasets, diffusers, peft), so neither side's peak memory carries imports the other
lacks; the sides run in turn within each repeat, the order rotating from repeat to repeat (machine load
drifts); same data, batch, dtype, steps and warm-up on every side. A step's time is the interval
between consecutive optimizer-step completions, the first `--warmup` intervals dropped on every side;
a run's figure is its median step. Memory: the run's peak RSS (ru_maxrss), and its growth over the RSS
after the common imports (what training itself holds: models, data, activations, optimizer state).
Ratios are taken per repeat (the runs of one repeat are close in time) and summarised by their median,
min and max. On the harness (bench/harness.py): raw figures go to bench/results/flow_dpo_step-<commit>.json.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/flow_dpo_step.py --models /path/to/tiny/models [--steps 16 --repeats 5]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_richpref(models: str, data: str, out: str, steps: int) -> list[float]:
    from richpref.schemas.training import FinetuneConfig
    from richpref.training.train import METRICS, train

    cfg = FinetuneConfig(models_root=models, model="flux", mode="lora", lora={"rank": 4},
                         flow={"max_sequence_length": 32}, data=[{"path": data}], resolution=64, train_batch_size=2,
                         max_train_steps=steps, learning_rate=1e-4, scale_lr=False, lr_scheduler="constant",
                         lr_warmup_steps=0, checkpointing_steps=10**9, beta=2000, seed=0, hflip=False)
    train(cfg, out)
    return [json.loads(line)["time"] for line in open(Path(out) / METRICS)]


def run_loop(models: str, data: str, steps: int, encode_every_step: bool) -> list[float]:
    import io

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig
    from PIL import Image

    from richpref.training.flow_models import LORA_TARGETS

    pipe = FluxPipeline.from_pretrained(Path(models) / "flux")
    tr, vae = pipe.transformer, pipe.vae
    for m in (tr, vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS["flux"]))
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    table = pq.read_table(data).to_pylist()

    def encode(caps):
        with torch.no_grad():
            pe, pooled, _ = pipe.encode_prompt(caps, None, device="cpu", max_sequence_length=32)
        return pe, pooled

    cache = {} if encode_every_step else {c: encode([c]) for c in {r["caption"] for r in table}}

    def img(b):
        return torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)

    stamps = []
    for step in range(steps):
        rows = [table[(2 * step + j) % len(table)] for j in range(2)]
        win = [r["jpg_0"] if r["label_0"] == 1 else r["jpg_1"] for r in rows]
        lose = [r["jpg_1"] if r["label_0"] == 1 else r["jpg_0"] for r in rows]
        pixels = torch.stack([img(b) for b in win + lose])
        with torch.no_grad():
            x0 = (vae.encode(pixels).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor
        caps = [r["caption"] for r in rows]
        if encode_every_step:
            pe, pooled = encode(caps)
        else:
            pe, pooled = (torch.cat(x) for x in zip(*(cache[c] for c in caps)))
        pe, pooled = pe.repeat(2, 1, 1), pooled.repeat(2, 1)
        b, c, h, w = x0.shape
        noise = torch.randn(2, c, h, w).repeat(2, 1, 1, 1)
        sig = compute_density_for_timestep_sampling("logit_normal", 2, logit_mean=0.0, logit_std=1.0).repeat(2)
        xt = (1 - sig.view(-1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1) * noise
        tokens = FluxPipeline._pack_latents(xt, b, c, h, w)
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", xt.dtype)
        kw = dict(hidden_states=tokens, timestep=sig, guidance=torch.full((b,), 3.5), pooled_projections=pooled,
                  encoder_hidden_states=pe, txt_ids=torch.zeros(pe.shape[1], 3), img_ids=ids, return_dict=False)
        target = FluxPipeline._pack_latents(noise - x0, b, c, h, w)
        with torch.no_grad():
            tr.disable_adapters()
            ref = tr(**kw)[0]
            tr.enable_adapters()
        pol = tr(**kw)[0]
        mse_p, mse_r = ((pol - target) ** 2).flatten(1).mean(1), ((ref - target) ** 2).flatten(1).mean(1)
        inside = -0.5 * 2000 * ((mse_p[:2] - mse_r[:2]) - (mse_p[2:] - mse_r[2:]))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.time())
    return stamps


COMMON_IMPORTS = ("accelerate", "datasets", "peft", "pyarrow.parquet", "diffusers", "richpref.training.train",
                  "richpref.training.flow_step", "richpref.training.text_cache")


def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    import importlib

    import torch

    torch.set_num_threads(1)
    for name in COMMON_IMPORTS:
        importlib.import_module(name)
    from diffusers import FluxPipeline  # noqa: F401 - resolved lazily by diffusers: resolve it on every side
    base_mb = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "richpref":
            stamps = run_richpref(args.models, args.data, tmp, args.steps)
        else:
            stamps = run_loop(args.models, args.data, args.steps, args.worker == "loop-encode")
    times = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"times": times, "peak_mb": peak_mb, "train_mb": peak_mb - base_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", required=True, help="tiny models folder (richpref models build-tiny)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=900, help="seconds one run may take (the machine may be loaded)")
    p.add_argument("--worker", choices=["richpref", "loop", "loop-encode"])
    p.add_argument("--data")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder of the raw-figures JSON")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "training")]  # the test helper that writes pairs
    from test_flow_step import write_brightness_pairs

    import harness

    sides = ["richpref", "loop", "loop-encode"]
    b = harness.Bench("flow_dpo_step", args.repeats, results_dir=Path(args.out))
    with tempfile.TemporaryDirectory() as tmp:
        data = str(write_brightness_pairs(Path(tmp) / "pairs.parquet", 32))

        def one(kind: str, rep: int) -> dict:
            _, env = b.fresh(f"{kind}-{rep}")
            cmd = [sys.executable, __file__, "--worker", kind, "--models", args.models, "--data", data,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = harness.run_process(cmd, env, timeout=args.timeout, cwd=str(REPO))
            if out["rc"] != 0:
                sys.exit(f"{kind} failed:\n{out['stderr'][-3000:]}")
            res = harness.child_result(out["stdout"])
            return {"step_ms": 1000 * statistics.median(res["times"]), "step_ms_min": 1000 * min(res["times"]),
                    "peak_mb": res["peak_mb"], "train_mb": res["train_mb"], "process_wall_s": out["wall_s"]}

        b.alternate(sides, one)  # the order rotates: no side always runs first
    derived: dict[int, dict] = {}
    for name, (num, den, key) in {"time_ratio": ("richpref", "loop", "step_ms"),
                                  "peak_memory_ratio": ("richpref", "loop", "peak_mb"),
                                  "training_memory_ratio": ("richpref", "loop", "train_mb"),
                                  "encode_every_step_time_ratio": ("loop-encode", "loop", "step_ms")}.items():
        for r in harness.ratios(b.runs, (num, key), (den, key), name):
            derived.setdefault(r["repeat"], {"side": "derived", "repeat": r["repeat"]})[name] = r[name]
    runs = b.runs + list(derived.values())
    s = harness.summarize(runs)
    head = harness.headline("time_ratio", s["time_ratio"]["median"], "x", "<= 1.0",
                            note=f"richpref / minimal loop, Flow-DPO median step time per repeat; goal also peak memory "
                                 f"ratio <= 1.0 (peak_memory_ratio {s['peak_memory_ratio']['median']:.3f}); tiny FLUX.1 "
                                 f"LoRA rank 4, 2 pairs per step, 64 px, fp32, {args.steps} steps, first {args.warmup} "
                                 f"dropped, 1 torch thread, each side a fresh process")
    head["met"] = bool(head["met"] and s["peak_memory_ratio"]["median"] <= 1.0)
    b.write(head, runs=runs)
    b.cleanup()


if __name__ == "__main__":
    main()
