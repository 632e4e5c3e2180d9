"""Flow-DPO's loss: hand-computed values, a transcription of the reference, what one micro-step feeds
the tiny transformer, and the edit-region weights.

Where each term comes from (read, not copied):
- yifan123/flow_grpo scripts/train_sd3_dpo.py (commit ac4c86e):
  L886 the rejected half reuses the chosen half's noise; L890-899 u = compute_density_for_timestep_sampling
  ('logit_normal', 0, 1), timestep = scheduler.timesteps[⌊u·N⌋], repeated for both halves (L899);
  L903 x_t = (1 − σ)·x0 + σ·ε; L924 target = noise − x0; L926-927 per-sample mean of (pred − target)²
  for policy and reference; L929-936 w_diff = θ_w − ref_w, l_diff = θ_l − ref_l, inside = −β/2·(w_diff − l_diff);
  L937 loss = −logsigmoid(inside); L949 implicit accuracy = fraction of inside > 0.
- bghira/SimpleTuner documentation/experimental/FLOW_DPO.md (commit 1b1d39b): L12 same prompt, noise and
  timestep for the rejected latents; L17-19 win_adv = L(ref_w) − L(pol_w), lose_adv = L(pol_l) − L(ref_l),
  loss = −logsigmoid(β/2·(win_adv + lose_adv)) (the same quantity); L22 target = noise − latents;
  L28 the optional mask applied to the prediction errors before reduction.
- diffusers examples/dreambooth/train_dreambooth_lora_sd3.py: σ sampling and loss weighting
  (training_utils.compute_density_for_timestep_sampling / compute_loss_weighting_for_sd3).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from richpref.training.flow_dpo import (SigmaTable, flow_dpo_terms, flow_noisy, mask_weights, sample_u,
                                        weighted_per_sample_mse)
from richpref.training.flow_models import pack

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def flow_grpo_transcription(model_pred, ref_pred, latents, noise, beta):
    """train_sd3_dpo.py L924-937 written out again (their tensors: first half chosen, second rejected)."""
    bsz = latents.shape[0] // 2
    target = noise - latents  # L924
    theta = ((model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)  # L926
    ref = ((ref_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)  # L927
    w_diff = theta[:bsz] - ref[:bsz]  # L933
    l_diff = theta[bsz:] - ref[bsz:]  # L934
    inside = -0.5 * beta * (w_diff - l_diff)  # L936
    return -F.logsigmoid(inside).mean(), inside  # L937


def test_loss_matches_hand_computed_values():
    # One pair, 1-element latents: errors chosen policy 1, ref 0.5; rejected policy 2, ref 2.5 (squared).
    target = torch.zeros(2, 1)
    model = torch.tensor([[1.0], [math.sqrt(2)]])
    ref = torch.tensor([[math.sqrt(0.5)], [math.sqrt(2.5)]])
    terms = flow_dpo_terms(model, ref, target, beta=2.0)
    # inside = −β/2·((1 − 0.5) − (2 − 2.5)) = −1; loss = −log σ(−1) = log(1 + e)
    assert terms.margin.item() == pytest.approx(-1.0, abs=1e-6)
    assert terms.loss.item() == pytest.approx(math.log(1 + math.e), abs=1e-6)
    assert terms.implicit_acc.item() == 0.0
    assert terms.reward_chosen.item() == pytest.approx(-0.5) and terms.reward_rejected.item() == pytest.approx(0.5)
    # SimpleTuner's form (FLOW_DPO.md L17-19) gives the same number.
    win_adv, lose_adv = 0.5 - 1.0, 2.0 - 2.5
    assert -F.logsigmoid(torch.tensor(2.0 / 2 * (win_adv + lose_adv))).item() == pytest.approx(terms.loss.item())
    # A per-sample loss weight of 2 (sigma_sqrt / cosmap at this σ; one σ per pair, so both halves): every
    # loss doubles, inside = −β/2·((2 − 1) − (4 − 5)) = −2, loss = log(1 + e²).
    weighted = flow_dpo_terms(model, ref, target, beta=2.0, sample_weight=torch.tensor([2.0, 2.0]))
    assert weighted.margin.item() == pytest.approx(-2.0, abs=1e-6)
    assert weighted.loss.item() == pytest.approx(math.log(1 + math.e ** 2), abs=1e-6)


def test_noising_and_target_by_hand():
    # two samples of (C, H, W) = (1, 1, 2), each with its own σ; ε of magnitude ≠ 1, so σ·ε is told apart
    # from σ/ε (an ε of −1 gave both the same x_t)
    x0 = torch.tensor([2.0, 4.0, -1.0, 3.0]).view(2, 1, 1, 2)
    eps = torch.tensor([-2.0, 0.5, 4.0, 1.0]).view(2, 1, 1, 2)
    xt, v = flow_noisy(x0, eps, torch.tensor([0.25, 0.5]))
    assert xt.shape == v.shape == (2, 1, 1, 2)
    # x_t = (1 − σ)·x0 + σ·ε ; v = ε − x0
    assert xt.flatten().tolist() == pytest.approx([0.75 * 2 + 0.25 * -2, 0.75 * 4 + 0.25 * 0.5,
                                                   0.5 * -1 + 0.5 * 4, 0.5 * 3 + 0.5 * 1])
    assert v.flatten().tolist() == pytest.approx([-4.0, -3.5, 5.0, -2.0])


def test_loss_matches_the_flow_grpo_transcription():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)
    sigmas = torch.rand(3, generator=g).repeat(2)
    xt, target = flow_noisy(latents, noise, sigmas)
    # a stand-in velocity field of x_t, so the noising enters the predictions
    model_pred, ref_pred = 0.9 * xt - 0.3, 1.1 * xt + 0.1
    ours = flow_dpo_terms(model_pred, ref_pred, target, beta=50.0)
    theirs, inside = flow_grpo_transcription(model_pred, ref_pred, latents, noise, beta=50.0)
    assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert torch.allclose(ours.margin, inside, rtol=1e-5, atol=1e-6)


def test_sigma_sampling_is_diffusers_density_on_the_scheduler_table(tiny_models):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    for scheme in ("logit_normal", "mode", "uniform"):
        ours = sample_u(64, scheme, generator=torch.Generator().manual_seed(1))
        ref = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                    generator=torch.Generator().manual_seed(1))
        assert torch.equal(ours, ref)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_models / "sd3", subfolder="scheduler")
    table = SigmaTable(sched)
    u = torch.tensor([0.0, 0.5, 0.999])
    sigmas, timesteps = table.draw(u)
    idx = (u * sched.config.num_train_timesteps).long()  # train_dreambooth_lora_sd3.py: timesteps[indices]
    assert torch.equal(timesteps, sched.timesteps[idx].float()) and torch.equal(sigmas, sched.sigmas[idx].float())
    # shift override: σ = s·u/(1 + (s − 1)·u) on the unshifted grid
    shifted = SigmaTable(sched, shift=3.0).sigmas
    base = SigmaTable(sched, shift=1.0).sigmas
    assert torch.allclose(shifted, 3 * base / (1 + 2 * base), atol=1e-6)


# --- masks -----------------------------------------------------------------------------------------

def test_all_ones_mask_is_the_unmasked_loss_and_floor_zero_ignores_outside():
    g = torch.Generator().manual_seed(2)
    model, ref, target = (torch.randn(4, 16, 8, 8, generator=g) for _ in range(3))
    plain = flow_dpo_terms(model, ref, target, beta=100.0)
    ones = mask_weights(torch.ones(2, 1, 64, 64), (8, 8), floor=0.0).repeat(2, 1, 1, 1)
    masked = flow_dpo_terms(model, ref, target, beta=100.0, weight=ones)
    assert torch.allclose(plain.margin, masked.margin, atol=1e-5) and plain.loss.item() == pytest.approx(masked.loss.item())

    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, :32] = 1.0  # the edit: the top half of the image
    w = mask_weights(mask, (8, 8), floor=0.0).repeat(2, 1, 1, 1)
    before = flow_dpo_terms(model, ref, target, beta=100.0, weight=w)
    changed = model.clone()
    changed[3, :, 6, 5] += 10.0  # rejected image of pair 1, a latent pixel in the bottom (unchanged) half
    after = flow_dpo_terms(changed, ref, target, beta=100.0, weight=w)
    assert torch.equal(before.margin, after.margin)
    w_floor = mask_weights(mask, (8, 8), floor=0.1).repeat(2, 1, 1, 1)
    assert not torch.equal(flow_dpo_terms(model, ref, target, beta=100.0, weight=w_floor).margin,
                           flow_dpo_terms(changed, ref, target, beta=100.0, weight=w_floor).margin)


def test_mask_weights_by_hand_floor_outside_one_inside_area_mean_on_a_border():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0  # the top half changed
    mask[..., 2, :2] = 1.0  # and half of the 2x2 cell at latent row 1, column 0
    w = mask_weights(mask, (2, 2), floor=0.1)  # 2x2 cells of the mask per latent pixel
    assert torch.allclose(w[0, 0], torch.tensor([[1.0, 1.0], [0.1 + 0.9 * 0.5, 0.1]]))


def test_mask_on_flux_packed_tokens_gives_the_same_loss():
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 64, 64, generator=g) > 0.5).float()
    w = mask_weights(mask, (8, 8), floor=0.2)
    grid = weighted_per_sample_mse(pred, target, w)
    tokens = weighted_per_sample_mse(pack(pred), pack(target), pack(w.expand(-1, 16, -1, -1)))
    assert torch.allclose(grid, tokens, rtol=1e-6)


def test_only_sigma_sqrt_and_cosmap_weight_the_loss():
    """The micro-step skips the per-sample weight for the schemes diffusers weights by 1."""
    from richpref.training.flow_dpo import LOSS_WEIGHTED, loss_weighting

    s = torch.tensor([0.1, 0.5, 0.9])
    for scheme in ("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"):
        assert (scheme in LOSS_WEIGHTED) == (not torch.equal(loss_weighting(scheme, s), torch.ones(3)))
