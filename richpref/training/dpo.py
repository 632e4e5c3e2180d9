"""The Diffusion-DPO objective (Wallace et al. 2024), as the reference implementations compute it.

Chosen (w) and rejected (l) latents of a pair share one noise sample and one timestep. For each
image the denoising loss is the mean squared error over channels and pixels; the trained model's and
the frozen reference's losses enter

    loss = −log σ(−β/2 · ((L_w − L_l) − (L_w,ref − L_l,ref)))

The argument of σ is the pair's implicit reward margin: with r(x) = −β/2 · (L(x) − L_ref(x)), it is
r(w) − r(l). The implicit accuracy is the fraction of pairs with a positive margin (ties count
half, as in the diffusers scripts); at the start (model = reference) every margin is 0, the loss is
log 2 and the accuracy 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of (pred − target)² over every axis but the first, in float32."""
    err = (pred.float() - target.float()) ** 2
    return err.mean(dim=tuple(range(1, err.ndim)))


@dataclass
class DPOTerms:
    loss: torch.Tensor  # scalar, differentiable
    margin: torch.Tensor  # per pair: r(w) − r(l)
    reward_chosen: torch.Tensor  # per pair: r(w) = −β/2 · (L_w − L_w,ref)
    reward_rejected: torch.Tensor  # per pair: r(l)
    model_loss: torch.Tensor  # mean denoising MSE of the model over both sides (for logging)
    ref_loss: torch.Tensor  # same for the reference

    @property
    def implicit_acc(self) -> torch.Tensor:
        m = self.margin.detach()
        return ((m > 0).float() + 0.5 * (m == 0).float()).mean()


def dpo_loss(model_losses: torch.Tensor, ref_losses: torch.Tensor, beta: float) -> DPOTerms:
    """DPO terms from per-sample losses laid out as [chosen pairs..., rejected pairs...] (length 2B)."""
    if model_losses.shape != ref_losses.shape or model_losses.ndim != 1 or model_losses.shape[0] % 2:
        raise ValueError(
            f"expected two 1-D tensors of equal even length (chosen half then rejected half), got "
            f"{tuple(model_losses.shape)} and {tuple(ref_losses.shape)}"
        )
    ref_losses = ref_losses.detach()
    model_w, model_l = model_losses.chunk(2)
    ref_w, ref_l = ref_losses.chunk(2)
    reward_w = -0.5 * beta * (model_w - ref_w)
    reward_l = -0.5 * beta * (model_l - ref_l)
    margin = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    return DPOTerms(
        loss=-F.logsigmoid(margin).mean(),
        margin=margin,
        reward_chosen=reward_w.detach(),
        reward_rejected=reward_l.detach(),
        model_loss=model_losses.detach().mean(),
        ref_loss=ref_losses.mean(),
    )


def diffusion_dpo_terms(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float) -> DPOTerms:
    """DPO terms from the model's and the reference's predictions for the 2B noisy latents."""
    return dpo_loss(per_sample_mse(model_pred, target), per_sample_mse(ref_pred, target), beta)
