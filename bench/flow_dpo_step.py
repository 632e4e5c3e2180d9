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

A step's time is the interval between consecutive optimizer-step completions; the first `--warmup`
steps are dropped. Peak memory is the worker's peak RSS (ru_maxrss). Prints the medians and the ratios
richpref / loop (goal ≤ 1.0) and loop-encode / loop.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/flow_dpo_step.py --models /path/to/tiny/models [--steps 30 --rounds 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
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


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "richpref":
            stamps = run_richpref(args.models, args.data, tmp, args.steps)
        else:
            stamps = run_loop(args.models, args.data, args.steps, args.worker == "loop-encode")
    times = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"times": times, "peak_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", required=True, help="tiny models folder (richpref models build-tiny)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", choices=["richpref", "loop", "loop-encode"])
    p.add_argument("--data")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(REPO / "tests"))
    from test_flow_finetune import write_brightness_pairs

    with tempfile.TemporaryDirectory() as tmp:
        data = str(write_brightness_pairs(Path(tmp) / "pairs.parquet", 32))
        pooled: dict[str, dict] = {k: {"times": [], "peak_mb": []} for k in ("richpref", "loop", "loop-encode")}
        for r in range(args.rounds):
            for kind in pooled:
                cmd = [sys.executable, __file__, "--worker", kind, "--models", args.models, "--data", data,
                       "--steps", str(args.steps), "--warmup", str(args.warmup)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{kind} failed:\n{out.stderr[-3000:]}")
                res = json.loads(line[7:])
                pooled[kind]["times"] += res["times"]
                pooled[kind]["peak_mb"].append(res["peak_mb"])
                print(f"round {r + 1} {kind:12s} median {1000 * statistics.median(res['times']):7.1f} ms/step  "
                      f"peak RSS {res['peak_mb']:.0f} MB", flush=True)
    med = {k: statistics.median(v["times"]) for k, v in pooled.items()}
    p10 = {k: statistics.quantiles(v["times"], n=10)[0] for k, v in pooled.items()}
    peak = {k: max(v["peak_mb"]) for k, v in pooled.items()}
    for k in pooled:
        print(f"{k:12s} median {1000 * med[k]:7.1f} ms/step  p10 {1000 * p10[k]:7.1f}  peak RSS {peak[k]:.0f} MB")
    print(f"richpref / loop: time {med['richpref'] / med['loop']:.3f} (medians), {p10['richpref'] / p10['loop']:.3f} "
          f"(p10), peak memory {peak['richpref'] / peak['loop']:.3f} (goal ≤ 1.0)")
    print(f"encode every step / cached: time {med['loop-encode'] / med['loop']:.3f} (medians), "
          f"{p10['loop-encode'] / p10['loop']:.3f} (p10)")


if __name__ == "__main__":
    main()
