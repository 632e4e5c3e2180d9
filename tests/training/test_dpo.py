"""The Diffusion-DPO loss: hand-computed values, the reference scripts' formulas, log 2 at the start."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from richpref.training.dpo import diffusion_dpo_terms, dpo_loss, per_sample_mse
from image_helpers import encoded


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_per_sample_mse_by_hand():
    pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])  # 2 samples of shape (1, 1, 2)
    target = torch.tensor([[[[0.0, 0.0]]], [[[3.0, -1.0]]]])
    # sample 0: (1² + 2²) / 2 = 2.5; sample 1: (3² + 1²) / 2 = 5
    assert per_sample_mse(pred, target).tolist() == [2.5, 5.0]


def test_loss_against_hand_computed_values():
    beta = 10.0
    # Two pairs: [chosen_1, chosen_2, rejected_1, rejected_2].
    model = torch.tensor([0.10, 0.30, 0.20, 0.25])
    ref = torch.tensor([0.12, 0.30, 0.18, 0.20])
    t = dpo_loss(model, ref, beta)
    # pair 1: model_diff = 0.10 − 0.20 = −0.10, ref_diff = 0.12 − 0.18 = −0.06
    #         margin = −β/2 · (−0.10 − (−0.06)) = −5 · −0.04 = 0.20
    # pair 2: model_diff = 0.30 − 0.25 = 0.05, ref_diff = 0.30 − 0.20 = 0.10
    #         margin = −5 · (0.05 − 0.10) = 0.25
    # loss = mean(log(1 + e^−0.20), log(1 + e^−0.25)) = mean(0.5981389, 0.5759394)
    assert t.margin.tolist() == pytest.approx([0.20, 0.25], abs=1e-6)
    assert t.loss.item() == pytest.approx((0.5981389 + 0.5759394) / 2, abs=1e-6)
    assert t.implicit_acc.item() == 1.0
    # r(w) = −5 · (L_w − L_w,ref): 0.1 and 0; r(l): −0.1 and −0.25
    assert t.reward_chosen.tolist() == pytest.approx([0.1, 0.0], abs=1e-6)
    assert t.reward_rejected.tolist() == pytest.approx([-0.1, -0.25], abs=1e-6)
    assert t.model_loss.item() == pytest.approx(0.2125, abs=1e-7)
    assert t.ref_loss.item() == pytest.approx(0.2, abs=1e-7)


def test_implicit_accuracy_counts_ties_half():
    model = torch.tensor([0.1, 0.2, 0.3, 0.1, 0.2, 0.3])  # rejected side equal to chosen side
    ref = torch.tensor([0.1, 0.5, 0.0, 0.1, 0.2, 0.3])
    # margins: pair 1 tie (0), pair 2: −5·(0 − 0.3) > 0, pair 3: −5·(0 − (−0.3)) < 0
    t = dpo_loss(model, ref, 10.0)
    assert t.implicit_acc.item() == pytest.approx((0.5 + 1 + 0) / 3)


def _diffusers_sd_script(model_pred, ref_pred, target, beta_dpo):
    """Direct transcription of diffusers' train_diffusion_dpo.py (sigmoid loss; its β is ours / 2)."""
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_loss = F.mse_loss(ref_pred.float(), target.float(), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, implicit_acc


def _reference_sdxl_form(model_pred, ref_pred, target, beta):
    """Direct transcription of the SDXL scripts' form: −logσ(−½β · (model_diff − ref_diff))."""
    m = ((model_pred - target) ** 2).mean(dim=[1, 2, 3])
    r = ((ref_pred - target) ** 2).mean(dim=[1, 2, 3])
    model_diff = m.chunk(2)[0] - m.chunk(2)[1]
    ref_diff = r.chunk(2)[0] - r.chunk(2)[1]
    inside_term = -0.5 * beta * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean()


def test_identical_to_reference_transcriptions_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(8, 4, 8, 8, generator=g)
    ref_pred = target + 0.3 * torch.randn(8, 4, 8, 8, generator=g)
    base = target + 0.3 * torch.randn(8, 4, 8, 8, generator=g)
    beta = 5000.0

    ours_in = base.clone().requires_grad_(True)
    ours = diffusion_dpo_terms(ours_in, ref_pred, target, beta)
    ours.loss.backward()

    theirs_in = base.clone().requires_grad_(True)
    theirs, acc = _diffusers_sd_script(theirs_in, ref_pred, target, beta / 2)
    theirs.backward()

    sdxl = _reference_sdxl_form(base, ref_pred, target, beta)
    assert ours.loss.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert ours.loss.item() == pytest.approx(sdxl.item(), rel=1e-6)
    assert ours.implicit_acc.item() == acc.item()
    assert torch.allclose(ours_in.grad, theirs_in.grad, rtol=1e-5, atol=1e-12)
    assert ours_in.grad.abs().sum() > 0


def test_reference_gets_no_gradient():
    model = torch.tensor([0.1, 0.2, 0.3, 0.4], requires_grad=True)
    ref = torch.tensor([0.2, 0.2, 0.2, 0.2], requires_grad=True)
    dpo_loss(model, ref, 100.0).loss.backward()
    assert ref.grad is None and model.grad is not None


def test_rejects_malformed_inputs():
    with pytest.raises(ValueError, match="equal even length"):
        dpo_loss(torch.zeros(3), torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="equal even length"):
        dpo_loss(torch.zeros(4), torch.zeros(2), 1.0)


def _random_pairs(n: int):
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def png() -> bytes:
        return encoded(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))

    return datasets.Dataset.from_dict({"caption": [f"thing {i}" for i in range(n)], "jpg_0": [png() for _ in range(n)],
                                       "jpg_1": [png() for _ in range(n)], "label_0": [i % 2 for i in range(n)]})


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_first_step_on_tiny_unet_is_log2(tiny_models, tmp_path, mode):
    """A real micro-step (VAE, text encoder, shared noise and timestep, reference pass) on the tiny SD:
    before any update the model is its reference, so every margin is 0 and the loss is log 2."""
    from richpref.schemas.training import FinetuneConfig
    from richpref.training.data import Augment, PairBatches, PairMixture
    from richpref.training.models import AdapterSwitch, add_lora, frozen_copy, load_parts
    from richpref.training.train import dpo_micro_step

    parts = load_parts(str(tiny_models / "sd15"))
    unet = parts.unet
    for m in (parts.vae, *parts.text_encoders, unet):
        m.requires_grad_(False)
    torch.manual_seed(0)
    if mode == "lora":
        add_lora(unet, FinetuneConfig().lora)
        reference = AdapterSwitch(unet)
        assert reference.direct and len(reference.layers) > 0
    else:
        reference = frozen_copy(unet)
        unet.requires_grad_(True)
    unet.train()  # as in training
    cfg = FinetuneConfig(model="unused", resolution=64, beta=5000)
    batches = PairBatches([_random_pairs(4)], PairMixture([4], [1.0], 0), Augment(64), batch_size=2)
    terms = dpo_micro_step(batches[0], parts, unet, unet, reference, cfg, device=torch.device("cpu"))
    assert terms.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms.margin.abs().max().item() == 0.0
    assert terms.implicit_acc.item() == 0.5
    assert terms.model_loss.item() == pytest.approx(terms.ref_loss.item(), abs=1e-7)
    terms.loss.backward()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert grads and all(g is None or torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_adapter_switch_is_diffusers_disable_adapters(tiny_models):
    """The LoRA reference: the fast switch gives exactly what diffusers' disable_adapters() gives."""
    from richpref.schemas.training import LoraSettings
    from richpref.training.models import AdapterSwitch, add_lora, load_parts

    unet = load_parts(str(tiny_models / "sd15")).unet
    unet.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(unet, LoraSettings(rank=4))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # a trained adapter: it changes the output
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)
    switch = AdapterSwitch(unet)
    with torch.no_grad():
        with_lora = unet(x, t, ctx).sample
        with switch.off():
            fast = unet(x, t, ctx).sample
        unet.disable_adapters()
        public = unet(x, t, ctx).sample
        unet.enable_adapters()
        again = unet(x, t, ctx).sample
    assert torch.equal(fast, public)
    assert not torch.allclose(fast, with_lora)
    assert torch.equal(again, with_lora)
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)
