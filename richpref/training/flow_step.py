"""One Flow-DPO micro-step: latents, the pair's shared (ε, σ), the reference and policy velocities, the loss.

Everything random about pair p (VAE sample, ε, σ) is drawn from generators seeded by (seed, tag, p):
the chosen and rejected images of a pair get the same ε and σ, and a resumed run sees the same draws.
"""
from __future__ import annotations

import contextlib

import torch

from ..schemas.training import FinetuneConfig
from .data import seed_for
from .flow_dpo import LOSS_WEIGHTED, flow_dpo_terms, flow_noisy, loss_weighting, mask_weights, sample_u
from .flow_models import encode_flow_latents, predict
from .models import AdapterSwitch


def pair_noise(cfg: FinetuneConfig, positions: list[int], latent_shape: tuple, sigma_table, tag: str = "noise"):
    """(ε, σ, t) per pair, each from the pair's own generator; ε and σ are then repeated for both halves."""
    flow = cfg.flow
    gens = [torch.Generator().manual_seed(seed_for(cfg.seed, tag, p)) for p in positions]
    noise = torch.stack([torch.randn(latent_shape, generator=g) for g in gens])
    u = torch.cat([sample_u(1, flow.weighting_scheme, logit_mean=flow.logit_mean, logit_std=flow.logit_std,
                            mode_scale=flow.mode_scale, generator=g) for g in gens])
    sigmas, timesteps = sigma_table.draw(u)
    return noise, sigmas, timesteps


def flow_micro_step(batch: dict, parts, model, base_model, reference, cfg: FinetuneConfig, *, text, sigma_table,
                    device: torch.device, weight_dtype: torch.dtype = torch.float32, autocast=contextlib.nullcontext,
                    tag: str = "noise", grad: bool = True):
    """Flow-DPO terms of one micro-batch (a `PairBatches` item); the caller does the backward.

    `model` is what is trained (possibly DDP-wrapped), `base_model` the bare transformer, `reference`
    an `AdapterSwitch` of it (LoRA: adapters off) or a frozen copy (full fine-tune).
    """
    positions = batch["positions"].tolist()
    pixels = batch["pixels"].to(device, dtype=parts.vae.dtype)
    vae_gens = [torch.Generator().manual_seed(seed_for(cfg.seed, "vae", tag, p, side)) for side in (0, 1)
                for p in positions]
    latents = encode_flow_latents(parts, pixels, vae_gens, cfg.vae_encode_batch_size).to(weight_dtype)
    noise, sigmas, timesteps = pair_noise(cfg, positions, tuple(latents.shape[1:]), sigma_table, tag)
    noise = noise.to(device, latents.dtype).repeat(2, 1, 1, 1)
    sigmas, timesteps = sigmas.to(device).repeat(2), timesteps.to(device).repeat(2)
    noisy, target = flow_noisy(latents, noise, sigmas)
    cond = text.batch(list(batch["captions"]) * 2, device, weight_dtype)

    weight = None
    if cfg.loss_mask == "edit_region" and "masks" in batch:
        weight = mask_weights(batch["masks"].to(device), tuple(latents.shape[-2:]), cfg.mask_floor).repeat(2, 1, 1, 1)
    # sigma_sqrt and cosmap weight each sample; the density schemes weight all alike (diffusers returns ones)
    scheme = cfg.flow.weighting_scheme
    sample_weight = loss_weighting(scheme, sigmas) if scheme in LOSS_WEIGHTED else None
    guidance = cfg.flow.guidance_scale

    with torch.no_grad(), autocast():
        if isinstance(reference, AdapterSwitch):
            with reference.off():
                ref_pred = predict(parts, base_model, noisy, sigmas, timesteps, cond, guidance)
        else:
            ref_pred = predict(parts, reference, noisy, sigmas, timesteps, cond, guidance)
    with (contextlib.nullcontext() if grad else torch.no_grad()), autocast():
        model_pred = predict(parts, model, noisy, sigmas, timesteps, cond, guidance)
    return flow_dpo_terms(model_pred, ref_pred, target, cfg.beta, weight=weight, sample_weight=sample_weight)
