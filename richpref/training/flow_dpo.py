"""Flow-DPO: the Diffusion-DPO objective for rectified-flow transformers (SD3/SD3.5, FLUX.1, Qwen-Image).

For a pair (x0_w, x0_l) with one noise sample ε and one noise level σ shared by both images:

    x_t = (1 − σ)·x0 + σ·ε          target v = ε − x0
    L(x) = mean over latent elements of w·(v_θ(x_t) − v)² / mean(w)     (w = 1 without a mask)
    loss = −log σ(−β/2 · ((L_w − L_w,ref) − (L_l − L_l,ref)))

as yifan123/flow_grpo's scripts/train_sd3_dpo.py computes it (tests/training/test_flow_dpo.py cites the lines).
σ is drawn as diffusers' SD3/FLUX DreamBooth scripts draw it: u from `weighting_scheme` (logit-normal,
mode, uniform), then the scheduler's sigma table at index ⌊u·N⌋ (the table carries the shift). The
optional per-element weight `w` is the edit-region mask on the latent grid with a floor outside it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dpo import DPOTerms, dpo_loss

DENSITY_SCHEMES = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTED = ("sigma_sqrt", "cosmap")  # schemes whose per-sample loss weight is not 1


def sample_u(n: int, scheme: str, *, logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """n values in [0, 1) drawn by diffusers' `compute_density_for_timestep_sampling` (logit_normal,
    mode; sigma_sqrt and cosmap draw uniformly and weight the loss instead)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(scheme, n, logit_mean=logit_mean, logit_std=logit_std,
                                                 mode_scale=mode_scale, generator=generator)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight of SD3's recipe (diffusers `compute_loss_weighting_for_sd3`)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas).float()


class SigmaTable:
    """The noise levels and model timesteps a flow-matching scheduler trains on, and the draw of one
    (σ, t) per pair from it. `shift` replaces the checkpoint scheduler's shift (static shifting)."""

    def __init__(self, scheduler, shift: float | None = None) -> None:
        if shift is not None:
            scheduler = type(scheduler).from_config(scheduler.config, shift=shift, use_dynamic_shifting=False)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.sigmas = scheduler.sigmas.float().clone()
        self.timesteps = scheduler.timesteps.float().clone()

    def draw(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = (u * self.num_train_timesteps).long().clamp(0, len(self.timesteps) - 1)
        return self.sigmas[idx], self.timesteps[idx]


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) of rectified flow: x_t = (1 − σ)·x0 + σ·ε and the velocity ε − x0."""
    s = sigmas.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1.0 - s) * x0 + s * noise, noise - x0


def weighted_per_sample_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of (pred − target)², or its weighted mean Σ w·err / Σ w when `weight`
    (broadcast to pred) is given; float32."""
    err = (pred.float() - target.float()) ** 2
    dims = tuple(range(1, err.ndim))
    if weight is None:
        return err.mean(dim=dims)
    w = weight.float().expand_as(err)
    return (w * err).sum(dim=dims) / w.sum(dim=dims).clamp_min(1e-12)


def mask_weights(mask: torch.Tensor, size: tuple[int, int], floor: float) -> torch.Tensor:
    """Per-latent-pixel weights from image-size masks (N, 1, H, W) in [0, 1]: area-resized to the latent
    grid `size`, then floor + (1 − floor)·mask (1 inside the edit, `floor` where nothing changed)."""
    m = F.interpolate(mask.float(), size=size, mode="area") if mask.shape[-2:] != tuple(size) else mask.float()
    return floor + (1.0 - floor) * m.clamp(0, 1)


def flow_dpo_terms(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float, *,
                   weight: torch.Tensor | None = None, sample_weight: torch.Tensor | None = None) -> DPOTerms:
    """DPO terms from the 2B predictions laid out [chosen..., rejected...] against the shared target.
    `weight`: per-element (mask) weights; `sample_weight`: per-sample loss weighting (sigma_sqrt, cosmap),
    equal for both halves of a pair since σ is shared."""
    model = weighted_per_sample_mse(model_pred, target, weight)
    ref = weighted_per_sample_mse(ref_pred, target, weight)
    if sample_weight is not None:
        model, ref = model * sample_weight, ref * sample_weight
    return dpo_loss(model, ref, beta)
