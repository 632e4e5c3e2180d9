"""Diffusion-DPO training under accelerate: SD 1.5 full or LoRA, SDXL LoRA; checkpointed and resumable.

Run it as `accelerate launch [--multi_gpu --num_processes N] -m richpref.training.train --config
finetune-tiny --output-dir DIR` (or through `richpref finetune` / the finetune flow, which build that
command). Every K optimizer steps the full training state is saved to DIR/checkpoint-<step>
(written to a temporary name, then renamed: a crash never leaves a half checkpoint that looks
whole); a new launch with the same DIR resumes from the latest one, and only the last M are kept.
The tuned weights land in DIR/final in diffusers' layout (see models.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import torch

from ..common.atomic import write_atomic
from ..models.runtime import resolve_model_ref
from ..schemas.config import ProfileError
from ..schemas.training import FinetuneConfig, finetune_config_hash, load_finetune_config
from .checkpoints import (TRAINER_STATE, OtherConfig, TrainingError, check_resumable, data_key, finished, full_state_dict,
                          param_norm, register_lora_hooks, save_checkpoint, write_final)
from .data import Augment, DataError, PairBatches, PairMixture, load_sources, split_heldout
from .flow_models import ArchMismatch
from .heldout import HeldOut, plot_metrics
from .models import FINETUNE_META, REFUSED_INPUT, AdapterSwitch
from .reference import log_start
from .setup import flow_settings, preflight, setup_model
from .unet_step import dpo_micro_step  # noqa: F401 - the UNet step, imported from here by callers

log = logging.getLogger("richpref")

METRICS = "metrics.jsonl"
# Tests simulate crashes with RICHPREF_TRAIN_FAULTS="kill-after-step:3": rank 0 SIGKILLs itself
# once step 3 is done (logged, and checkpointed if it is a checkpoint step), the first time only.
FAULTS_ENV = "RICHPREF_TRAIN_FAULTS"


def _inject_fault(step: int, is_main: bool, out: Path) -> None:
    """Each fault fires once per output dir (a marker file remembers it), so the relaunch survives."""
    for item in filter(None, (x.strip() for x in os.environ.get(FAULTS_ENV, "").split(","))):
        kind, _, at = item.partition(":")
        marker = out / f".fault-{kind}-{at}"
        if kind == "kill-after-step" and int(at) == step and is_main and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _make_optimizer(cfg: FinetuneConfig, params: list, lr: float, device: torch.device):
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    # The fused kernel (CPU and CUDA) updates all tensors at once: a large share of a LoRA step on
    # small models is the per-tensor Python loop of the default implementation.
    fused = device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                             eps=cfg.adam_epsilon, fused=fused or None)


class _Metrics:
    NAMES = ("loss", "implicit_acc", "reward_margin", "reward_chosen", "reward_rejected", "model_loss", "ref_loss")

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # on the step's device: no host sync per micro-step
        self.count = 0

    def add(self, terms) -> None:
        values = [terms.loss.detach(), terms.implicit_acc, terms.margin.detach().mean(), terms.reward_chosen.mean(),
                  terms.reward_rejected.mean(), terms.model_loss, terms.ref_loss]
        row = torch.stack([v.float() for v in values])
        self.sums = row if self.sums is None else self.sums + row
        self.count += 1

    def mean(self) -> torch.Tensor:
        return self.sums / max(self.count, 1)


def train(cfg: FinetuneConfig, output_dir: str | os.PathLike) -> dict:
    """Train (or resume, or find already done) the DPO run in `output_dir`; returns its summary."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    out = Path(output_dir)
    cfg_hash = finetune_config_hash(cfg)
    final = out / "final"
    done = finished(cfg, out)
    if done is not None:
        log.info("finetune %s: already trained to step %d, nothing to do", out, done["steps"])
        return done

    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,  # the lr schedule counts optimizer steps, whatever the world size
        project_config=ProjectConfiguration(project_dir=str(out)),
    )
    from accelerate.utils import DistributedType

    if cfg.fsdp and accelerator.distributed_type != DistributedType.FSDP:
        from .launcher import FSDP_NEEDS_GPUS

        raise TrainingError(f"fsdp: true, but accelerate set up {accelerator.distributed_type.value}, not FSDP: launch "
                            "with `richpref finetune --num-processes N` on N GPUs (it passes --use_fsdp); "
                            f"{FSDP_NEEDS_GPUS}. Or use mode: lora with fsdp: false")
    is_main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    accum = cfg.accumulation_steps(world)
    lr = cfg.learning_rate_for(world)
    weight_dtype = _weight_dtype(accelerator.mixed_precision)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    data = data_key(cfg)  # recorded in each checkpoint and in final/: what these weights trained on
    resume_from = check_resumable(cfg, out, data)
    on_fsdp = accelerator.distributed_type == DistributedType.FSDP
    arch = preflight(cfg, fsdp=on_fsdp)  # the checks `richpref finetune` made: a deployment run skips the CLI

    # the pairs before the models: a source without a usable pair fails in seconds, not after a model load
    masks = cfg.loss_mask == "edit_region"
    with accelerator.main_process_first():
        sources, labels = load_sources(cfg.data, need_mask=masks)
    split = [split_heldout(ds, cfg.heldout_fraction, cfg.seed, label) for ds, label in zip(sources, labels)]
    sources = [train_ds for train_ds, _ in split]
    held, held_labels = [h for _, h in split if h is not None], [n for (_, h), n in zip(split, labels) if h is not None]
    flow = flow_settings(cfg, arch)
    text = None
    if flow is not None:
        # every caption encoded once (each process a share), before the transformer loads: the text encoders
        # (T5-XXL, Qwen2.5-VL-7B) and the transformer never share the device, and are gone before training
        from .text_cache import build_text_cache

        captions = [str(c or "") for ds in sources + held for c in ds["caption"]]
        text = build_text_cache(resolve_model_ref(cfg.model, cfg.models_root), arch, captions,
                                cfg.text_cache_dir or out, max_sequence_length=flow.max_sequence_length,
                                batch_size=flow.text_encode_batch_size, device=device, rank=rank, world=world,
                                barrier=accelerator.wait_for_everyone)
    setup = setup_model(cfg, device, weight_dtype, fsdp=on_fsdp, arch=arch)
    parts, unet, reference, vae_dtype, model_dir = (setup.parts, setup.model, setup.reference, setup.vae_dtype,
                                                    setup.model_dir)
    params = [p for p in unet.parameters() if p.requires_grad]

    optimizer = _make_optimizer(cfg, params, lr, device)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_train_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    base_unet = accelerator.unwrap_model(unet)

    if cfg.mode == "lora":
        register_lora_hooks(accelerator, base_unet)
        if reference is None:
            reference = AdapterSwitch(base_unet)

    global_step, samples_seen = 0, 0
    if resume_from:
        accelerator.load_state(str(resume_from[1]))
        state = json.loads((resume_from[1] / TRAINER_STATE).read_text())
        global_step, samples_seen = state["global_step"], state["samples_seen"]
        log.info("finetune %s: resumed from %s (step %d)", out, resume_from[1].name, global_step)

    heldout = HeldOut(held, cfg, cfg.train_batch_size, held_labels) if held else None
    if setup.flow is not None:
        from .flow_dpo import SigmaTable

        sigma_table = SigmaTable(parts.scheduler, setup.flow.shift)

    # arch auto on a flow-matching checkpoint without a `flow:` section: the steps use setup's defaults
    step_cfg = cfg if setup.flow is None else cfg.model_copy(update={"flow": setup.flow})

    def micro_step(batch: dict, tag: str = "noise", grad: bool = True):
        if setup.flow is not None:
            from .flow_step import flow_micro_step

            return flow_micro_step(batch, parts, unet, base_unet, reference, step_cfg, text=text, sigma_table=sigma_table,
                                   device=device, weight_dtype=weight_dtype, autocast=accelerator.autocast, tag=tag,
                                   grad=grad)
        return dpo_micro_step(batch, parts, unet, base_unet, reference, cfg, device=device, weight_dtype=weight_dtype,
                              vae_dtype=vae_dtype, autocast=accelerator.autocast, tag=tag, grad=grad)

    mixture = PairMixture([len(s) for s in sources], [c.weight for c in cfg.data], cfg.seed)
    augment = Augment(cfg.resolution, cfg.random_crop, cfg.hflip, cfg.proportion_empty_prompts, cfg.seed)
    batches = PairBatches(sources, mixture, augment, cfg.train_batch_size, rank, world, samples_seen, labels, masks)
    micro_total = (cfg.max_train_steps - global_step) * accum
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(max(micro_total, 0)),
                                         num_workers=cfg.dataloader_num_workers,
                                         persistent_workers=False)
    stream = iter(loader)
    launch_id = uuid.uuid4().hex[:8]
    if is_main:
        log.info("finetune %s: %s %s, %d process(es) × %d pairs × %d accumulation = %d pairs/step, lr %.3g, "
                 "steps %d→%d", out, setup.arch, cfg.mode, world, cfg.train_batch_size, accum,
                 world * cfg.train_batch_size * accum, lr, global_step, cfg.max_train_steps)

    step_timer = time.perf_counter()
    last_logged: dict = {}
    train_losses: list[float] = []
    while global_step < cfg.max_train_steps:
        metrics = _Metrics()
        for micro in range(accum):
            batch = next(stream)
            sync = micro == accum - 1
            ctx = accelerator.no_sync(unet) if not sync else contextlib.nullcontext()
            with ctx:
                terms = micro_step(batch)
                accelerator.backward(terms.loss / accum)
            metrics.add(terms)
        if global_step == 0:  # a fresh start: these metrics are the model's before any update
            start = accelerator.reduce(metrics.mean().to(device), reduction="mean").cpu().tolist()
            if is_main:
                log_start(start[0], start[1], cfg.reference)
        # the prepared model's parameters: under FSDP, the norm is taken over every shard together
        grad_norm = accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        samples_seen += accum * world * cfg.train_batch_size

        if global_step % cfg.log_every == 0 or global_step == cfg.max_train_steps:
            reduced = accelerator.reduce(metrics.mean().to(device), reduction="mean").cpu().tolist()
            now = time.perf_counter()
            with torch.no_grad():
                weights_norm = param_norm(unet, params)
            record = {"step": global_step, **dict(zip(_Metrics.NAMES, reduced)),
                      "grad_norm": float(grad_norm), "param_norm": weights_norm,
                      "lr": lr_scheduler.get_last_lr()[0], "samples_seen": samples_seen,
                      "step_seconds": (now - step_timer) / cfg.log_every, "launch": launch_id,
                      "resumed_from": resume_from[0] if resume_from else None, "time": time.time()}
            step_timer = now
            last_logged = record
            train_losses.append(record["loss"])
            if is_main:
                with open(out / METRICS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("step %d/%d loss %.4f acc %.2f margin %.4g lr %.3g %.2fs/step", global_step,
                         cfg.max_train_steps, record["loss"], record["implicit_acc"], record["reward_margin"],
                         record["lr"], record["step_seconds"])

        if heldout is not None and (global_step % cfg.eval_every == 0 or global_step == cfg.max_train_steps):
            unet.eval()
            result = heldout.record(global_step, heldout.evaluate(lambda b, tag: micro_step(b, tag, grad=False)),
                                    train_losses)
            unet.train()
            last_logged = {**last_logged, **{k: v for k, v in result.items() if k not in ("step", "kind")}}
            if is_main:
                with open(out / METRICS, "a", encoding="utf-8") as f:
                    f.write(json.dumps({**result, "time": time.time()}) + "\n")
                log.info("step %d held-out: acc %.3f margin %.4g (%d pairs × %d draws)", global_step,
                         result["heldout_implicit_acc"], result["heldout_reward_margin"], result["heldout_pairs"],
                         result["heldout_draws"])

        # the last step too (as diffusers' scripts do): a run trained longer later resumes from it
        if global_step % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, out, global_step, samples_seen, cfg_hash, cfg.checkpoints_total_limit, data)
        _inject_fault(global_step, is_main, out)

    accelerator.wait_for_everyone()
    summary = {}
    gathered = full_state_dict(unet)  # under FSDP each process holds a shard: every one takes part in the gather
    if is_main:
        summary = write_final(base_unet, out, cfg, cfg_hash, setup.arch, model_dir, global_step, last_logged, gathered,
                              data)
        if heldout is not None:
            plot_metrics(out, METRICS)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not is_main:
        summary = json.loads((final / FINETUNE_META).read_text())
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m richpref.training.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="finetune config: a name in configs/ (finetune-tiny) or a YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--output-dir", required=True, help="checkpoints, metrics.jsonl and final/ go here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # Progress lines from the first process only; the others speak up for warnings and errors.
    rank = int(os.environ.get("RANK", "0"))
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        cfg = load_finetune_config(args.config, args.set)
    except ProfileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        train(cfg, args.output_dir)
    except (DataError, OtherConfig, ArchMismatch) as exc:  # e.g. an image that cannot be decoded, met at some step
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.output_dir) / REFUSED_INPUT, f"{exc}\n".encode())  # every process may write it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
