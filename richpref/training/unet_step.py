"""One Diffusion-DPO micro-step of an SD 1.5 / SDXL UNet (epsilon or v-prediction)."""
from __future__ import annotations

import contextlib

import torch

from ..schemas.training import FinetuneConfig
from .checkpoints import TrainingError
from .data import seed_for
from .dpo import diffusion_dpo_terms, dpo_loss
from .flow_dpo import mask_weights, weighted_per_sample_mse
from .models import AdapterSwitch, encode_latents, encode_text, sdxl_time_ids


def dpo_micro_step(batch: dict, parts, unet, base_unet, reference, cfg: FinetuneConfig, *, device: torch.device,
                   weight_dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32,
                   autocast=contextlib.nullcontext, tag: str = "noise", grad: bool = True):
    """DPO terms of one micro-batch (a `PairBatches` item); the caller does the backward.

    `unet` is what is trained (possibly wrapped by DDP), `base_unet` the bare module. `reference`
    is a frozen copy (full fine-tunes) or an `AdapterSwitch` of `base_unet` (LoRA: the same UNet
    with its adapters off).
    """
    positions = batch["positions"].tolist()
    pixels = batch["pixels"].to(device, dtype=vae_dtype, non_blocking=True)
    # Per-sample generators: chosen and rejected get their own VAE draw, the pair one noise and one t.
    vae_gens = [torch.Generator().manual_seed(seed_for(cfg.seed, "vae", p, side) if tag == "noise"
                                           else seed_for(cfg.seed, "vae", tag, p, side)) for side in (0, 1) for p in positions]
    latents = encode_latents(parts.vae, pixels, vae_gens, cfg.vae_encode_batch_size).to(weight_dtype)
    noise_gens = [torch.Generator().manual_seed(seed_for(cfg.seed, tag, p)) for p in positions]
    num_t = parts.noise_scheduler.config.num_train_timesteps
    timesteps = torch.stack([torch.randint(0, num_t, (), generator=g) for g in noise_gens]).repeat(2).to(device)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in noise_gens])
    noise = noise.to(device, latents.dtype).repeat(2, 1, 1, 1)
    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = parts.noise_scheduler.config.prediction_type
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = parts.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise TrainingError(f"unsupported prediction_type {prediction!r} in the model's scheduler config")

    embeds, pooled = encode_text(parts, list(batch["captions"]), device, weight_dtype)
    embeds = embeds.repeat(2, 1, 1)
    kwargs = {}
    if parts.arch == "sdxl":
        time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], cfg.resolution)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.repeat(2, 1),
                                       "time_ids": time_ids.to(device, weight_dtype).repeat(2, 1)}

    # Reference first: its activations are freed before the trained model's graph is built.
    with torch.no_grad(), autocast():
        if isinstance(reference, AdapterSwitch):
            with reference.off():
                ref_pred = base_unet(noisy, timesteps, embeds, **kwargs).sample
        else:
            ref_pred = reference(noisy, timesteps, embeds, **kwargs).sample
    with (contextlib.nullcontext() if grad else torch.no_grad()):
        model_pred = unet(noisy, timesteps, embeds, **kwargs).sample
    if cfg.loss_mask == "edit_region" and "masks" in batch:
        weight = mask_weights(batch["masks"].to(device), tuple(latents.shape[-2:]), cfg.mask_floor).repeat(2, 1, 1, 1)
        return dpo_loss(weighted_per_sample_mse(model_pred, target, weight),
                        weighted_per_sample_mse(ref_pred, target, weight), cfg.beta)
    return diffusion_dpo_terms(model_pred, ref_pred, target, cfg.beta)
