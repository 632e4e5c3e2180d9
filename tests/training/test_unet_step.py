"""What a DPO micro-step feeds the UNets, checked against the formulas by hand on the tiny models.

At step 0 the model equals its reference, so "the first loss is log 2" holds whatever noise,
timesteps or target the step uses. These tests look at the batch itself: the UNet calls are
recorded (the real tiny UNets run; a thin wrapper keeps a copy of their inputs and outputs), the VAE
is made deterministic (its posterior variance set to ~0) so the latents are known, and from the noisy
latents and timesteps the noise is recovered with the DDPM forward formula
x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε. Then: chosen and rejected share ε and t; the loss's per-image
errors are those against ε (epsilon models) or v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x_0 (v-prediction
models); SDXL gets each pair's (original h, w, crop top, left, target h, w) on both of its images.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
from image_helpers import encoded

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BETA = 2.0  # reward = −β/2 · (L − L_ref) = −(L − L_ref): per-image losses read straight off the terms


class Recorder(torch.nn.Module):
    """Runs the wrapped UNet and keeps a copy of what went in and what came out."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet
        self.calls: list[dict] = []

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        out = self.unet(sample, timestep, encoder_hidden_states, **kwargs)
        self.calls.append({"sample": sample.detach().clone(), "t": timestep.detach().clone(),
                           "context": encoder_hidden_states.detach().clone(), "kwargs": kwargs,
                           "pred": out.sample.detach().float().clone()})
        return out


def _pairs(sizes: list[tuple[int, int]]):
    """A pair source with one pair per (width, height); chosen and rejected differ."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(1)

    def png(w: int, h: int) -> bytes:
        return encoded(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))

    return datasets.Dataset.from_dict({
        "caption": [f"a thing number {i}" for i in range(len(sizes))],
        "jpg_0": [png(w, h) for w, h in sizes], "jpg_1": [png(w, h) for w, h in sizes],
        "label_0": [1] * len(sizes)})


def _setup(model_dir, prediction_type: str = "epsilon"):
    """Tiny parts with a deterministic VAE, a reference, and a trained UNet moved away from it."""
    from diffusers import DDPMScheduler

    from richpref.training.models import frozen_copy, load_parts

    parts = load_parts(str(model_dir))
    if prediction_type != parts.noise_scheduler.config.prediction_type:
        parts.noise_scheduler = DDPMScheduler.from_config(parts.noise_scheduler.config, prediction_type=prediction_type)
    latent = parts.vae.config.latent_channels
    with torch.no_grad():  # log-variance −30: the posterior sample is its mean to ~3e-7
        parts.vae.quant_conv.weight[latent:] = 0
        parts.vae.quant_conv.bias[latent:] = -30.0
    for m in (parts.vae, *parts.text_encoders, parts.unet):
        m.requires_grad_(False)
    reference = frozen_copy(parts.unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in parts.unet.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return parts, reference


def _step(parts, reference, sizes, **cfg_kw):
    from richpref.schemas.training import FinetuneConfig
    from richpref.training.data import Augment, PairBatches, PairMixture
    from richpref.training.train import dpo_micro_step

    model, ref = Recorder(parts.unet), Recorder(reference)
    cfg = FinetuneConfig(model="unused", resolution=64, beta=BETA, **cfg_kw)
    batches = PairBatches([_pairs(sizes)], PairMixture([len(sizes)], [1.0], 0), Augment(64, hflip=False),
                          batch_size=len(sizes))
    batch = batches[0]
    terms = dpo_micro_step(batch, parts, model, parts.unet, ref, cfg, device=torch.device("cpu"))
    return batch, terms, model.calls[0], ref.calls[0]


def _recovered(parts, batch, call):
    """(x_0, ε, ᾱ_t broadcast) from the recorded noisy latents and the deterministic VAE."""
    with torch.no_grad():
        x0 = parts.vae.encode(batch["pixels"].float()).latent_dist.mean * parts.vae.config.scaling_factor
    abar = parts.noise_scheduler.alphas_cumprod[call["t"]].float().view(-1, 1, 1, 1)
    eps = (call["sample"].float() - abar.sqrt() * x0) / (1 - abar).sqrt()
    return x0, eps, abar


def _per_image_mse(pred, target):
    return ((pred - target) ** 2).mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def sd15(tiny_models):
    return tiny_models / "sd15"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pairs_share_noise_and_timestep_and_the_loss_uses_the_right_target(sd15, prediction_type):
    parts, reference = _setup(sd15, prediction_type)
    sizes = [(64, 64)] * 3
    batch, terms, model_call, ref_call = _step(parts, reference, sizes)
    b = len(sizes)
    t = model_call["t"]
    # One timestep per pair, the same for its two images; pairs draw their own.
    assert torch.equal(t[:b], t[b:]) and len(set(t[:b].tolist())) > 1
    assert torch.equal(ref_call["t"], t) and torch.equal(ref_call["sample"], model_call["sample"])
    from richpref.training.models import encode_text

    text, _ = encode_text(parts, list(batch["captions"]), torch.device("cpu"), torch.float32)
    assert torch.equal(model_call["context"], text.repeat(2, 1, 1))  # each pair's caption on both its images
    assert torch.equal(ref_call["context"], model_call["context"])
    x0, eps, abar = _recovered(parts, batch, model_call)
    assert not torch.allclose(x0[:b], x0[b:], atol=1e-2)  # the two images differ...
    assert torch.allclose(eps[:b], eps[b:], atol=2e-3)  # ...their noise does not
    assert 0.8 < eps.std().item() < 1.2  # a standard normal draw
    assert not torch.allclose(eps[0], eps[1], atol=1e-1)  # and pairs draw their own
    target = eps if prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    model_l, ref_l = _per_image_mse(model_call["pred"], target), _per_image_mse(ref_call["pred"], target)
    # −β/2 · (L − L_ref) with β = 2: the rewards are the loss differences, image by image.
    want_chosen, want_rejected = -(model_l[:b] - ref_l[:b]), -(model_l[b:] - ref_l[b:])
    assert want_chosen.abs().min() > 1e-3  # the trained UNet really differs from its reference
    assert torch.allclose(terms.reward_chosen, want_chosen, atol=2e-4, rtol=1e-3)
    assert torch.allclose(terms.reward_rejected, want_rejected, atol=2e-4, rtol=1e-3)
    assert terms.model_loss.item() == pytest.approx(model_l.mean().item(), rel=1e-3)
    margin = want_chosen - want_rejected
    assert terms.loss.item() == pytest.approx(torch.nn.functional.softplus(-margin).mean().item(), rel=1e-3)


def test_the_other_prediction_types_target_would_not_match(sd15):
    """The target check can tell ε from v: on a v-prediction model, ε gives other rewards."""
    parts, reference = _setup(sd15, "v_prediction")
    batch, terms, model_call, ref_call = _step(parts, reference, [(64, 64)] * 2)
    _, eps, _ = _recovered(parts, batch, model_call)
    wrong = -(_per_image_mse(model_call["pred"], eps) - _per_image_mse(ref_call["pred"], eps))
    assert not torch.allclose(terms.reward_chosen, wrong[:2], atol=2e-4, rtol=1e-3)


def test_unknown_prediction_type_is_refused(sd15):
    from richpref.training.train import TrainingError

    parts, reference = _setup(sd15)
    parts.noise_scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(TrainingError, match="unsupported prediction_type 'sample'"):
        _step(parts, reference, [(64, 64)])


def test_sdxl_gets_each_pairs_time_ids_and_pooled_text_on_both_images(tiny_models):
    parts, reference = _setup(tiny_models / "sdxl")
    # (width, height) -> at resolution 64, shorter side to 64, centre crop:
    #   96×64: original (h 64, w 96), resized 96×64, crop top 0, left round(32/2) = 16
    #   64×80: original (h 80, w 64), resized 64×80, crop top round(16/2) = 8, left 0
    batch, terms, model_call, ref_call = _step(parts, reference, [(96, 64), (64, 80)])
    by_row = {0: [64, 96, 0, 16, 64, 64], 1: [80, 64, 8, 0, 64, 64]}
    rows = [int(c.rsplit(" ", 1)[1]) for c in batch["captions"]]  # the mixture shuffles the rows
    assert sorted(rows) == [0, 1]
    want = torch.tensor([by_row[r] for r in rows], dtype=torch.float32)
    added = model_call["kwargs"]["added_cond_kwargs"]
    assert torch.equal(added["time_ids"].float(), torch.cat([want, want]))
    assert torch.equal(ref_call["kwargs"]["added_cond_kwargs"]["time_ids"], added["time_ids"])
    pooled = added["text_embeds"]
    assert pooled.shape[0] == 4 and torch.equal(pooled[:2], pooled[2:]) and not torch.equal(pooled[0], pooled[1])
    assert torch.equal(model_call["context"][:2], model_call["context"][2:])
    assert torch.isfinite(terms.loss)


def test_sdxl_time_ids_by_hand():
    from richpref.training.models import sdxl_time_ids

    ids = sdxl_time_ids(torch.tensor([[512, 768], [1024, 683]]), torch.tensor([[0, 128], [170, 0]]), 1024)
    assert ids.tolist() == [[512, 768, 0, 128, 1024, 1024], [1024, 683, 170, 0, 1024, 1024]]


def test_each_image_of_a_pair_draws_its_vae_sample_from_its_own_seed(sd15, monkeypatch):
    """Chosen and rejected share ε and t, never their VAE sample: each image's generator is seeded by
    (seed, "vae", pair, side), and by the tag too for other draws than training's (held-out pairs)."""
    from richpref.schemas.training import FinetuneConfig
    from richpref.training import unet_step
    from richpref.training.data import Augment, PairBatches, PairMixture, seed_for

    parts, reference = _setup(sd15)
    seen, real = [], unet_step.encode_latents

    def spy(vae, pixels, generators, batch_size):
        seen.append(generators)
        return real(vae, pixels, generators, batch_size)

    monkeypatch.setattr(unet_step, "encode_latents", spy)
    batch = PairBatches([_pairs([(64, 64)] * 2)], PairMixture([2], [1.0], 0), Augment(64, hflip=False), batch_size=2)[0]
    cfg = FinetuneConfig(model="unused", resolution=64, beta=BETA, seed=3)
    for tag in ("noise", "heldout"):
        unet_step.dpo_micro_step(batch, parts, parts.unet, parts.unet, reference, cfg, device=torch.device("cpu"),
                                 tag=tag, grad=False)
    positions = batch["positions"].tolist()
    assert [[g.initial_seed() for g in gens] for gens in seen] == [
        [seed_for(3, "vae", p, side) for side in (0, 1) for p in positions],  # as before tags: resumes keep their draws
        [seed_for(3, "vae", "heldout", p, side) for side in (0, 1) for p in positions]]
    assert len({g.initial_seed() for gens in seen for g in gens}) == 4 * len(positions)
