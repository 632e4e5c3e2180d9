"""Flow-DPO on the tiny SD3 / FLUX.1 / Qwen-Image twins: what a micro-step feeds the transformer, the
reference, learning a toy preference, the LoRA round trip, and the configs refused before training."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from richpref.schemas.training import FinetuneConfig
from image_helpers import encoded

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(array: np.ndarray, mode: str = "RGB") -> bytes:
    return encoded(Image.fromarray(array.astype(np.uint8), mode=None if mode == "RGB" else mode))


def write_brightness_pairs(path: Path, n: int, seed: int = 0, masks: bool = False) -> Path:
    """Toy preference: the brighter image of each pair is preferred (jpg_0 or jpg_1 at random)."""
    rng = np.random.default_rng(seed)
    hi, lo, swap = rng.uniform(150, 230, n), rng.uniform(25, 105, n), rng.random(n) < 0.5

    def img(level):
        return np.clip(level + rng.normal(0, 20, (64, 64, 3)), 0, 255)

    table = {"caption": [f"a photo of object {i % 5}" for i in range(n)],
             "jpg_0": [_png(img(h if s else lo_)) for h, lo_, s in zip(hi, lo, swap)],
             "jpg_1": [_png(img(lo_ if s else h)) for h, lo_, s in zip(hi, lo, swap)],
             "label_0": [1.0 if s else 0.0 for s in swap]}
    if masks:
        m = np.zeros((64, 64), np.uint8)
        m[:32] = 255
        table["edit_mask"] = [_png(m, "L")] * n
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), path)
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_brightness_pairs(tmp_path_factory.mktemp("flowpairs") / "pairs.parquet", 48)


def flow_config(tiny_models: Path, data: Path, model: str = "sd3", **kw) -> FinetuneConfig:
    base = dict(models_root=str(tiny_models), model=model, mode="lora", lora={"rank": 8},
                flow={"max_sequence_length": 16}, data=[{"name": "pairs", "path": str(data)}], resolution=32,
                learning_rate=1e-3, scale_lr=False, lr_scheduler="constant", lr_warmup_steps=0, train_batch_size=4,
                max_train_steps=2, checkpointing_steps=1000, beta=2000, hflip=False, seed=0)
    return FinetuneConfig(**{**base, **kw})


class Recorder(torch.nn.Module):
    """Runs the wrapped transformer and keeps what went in and came out."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.calls: list[dict] = []

    def forward(self, **kw):
        out = self.inner(**kw)
        self.calls.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kw.items()}
                          | {"pred": out[0].detach().float().clone()})
        return out


def _micro(tiny_models, pairs, tmp_path, model="sd3", monkeypatch=None, **kw):
    from richpref.training import flow_step
    from richpref.training.data import Augment, PairBatches, PairMixture, load_sources
    from richpref.training.flow_dpo import SigmaTable
    from richpref.training.models import AdapterSwitch
    from richpref.training.setup import setup_model
    from richpref.training.text_cache import build_text_cache

    cfg = flow_config(tiny_models, pairs, model, **kw)
    setup = setup_model(cfg, torch.device("cpu"), torch.float32)
    sources, _ = load_sources(cfg.data, need_mask=cfg.loss_mask == "edit_region")
    text = build_text_cache(setup.model_dir, setup.arch, list(sources[0]["caption"]), tmp_path, max_sequence_length=16)
    batches = PairBatches(sources, PairMixture([len(sources[0])], [1.0], 0), Augment(32, hflip=False), 2,
                          masks=cfg.loss_mask == "edit_region")
    seen = {}
    real = flow_step.encode_flow_latents

    def spy(*a, **k):
        seen["generators"] = a[2]
        seen["latents"] = real(*a, **k)
        return seen["latents"]

    monkeypatch.setattr(flow_step, "encode_flow_latents", spy)
    rec = Recorder(setup.model)

    def step(batch):
        return flow_step.flow_micro_step(batch, setup.parts, rec, rec, AdapterSwitch(setup.model), cfg, text=text,
                                         sigma_table=SigmaTable(setup.parts.scheduler), device=torch.device("cpu"))
    return setup, batches, step, rec, seen


def test_micro_step_shares_noise_and_sigma_and_targets_eps_minus_x0(tiny_models, pairs, tmp_path, monkeypatch):
    """Catches: unshared ε or σ between the halves, a swapped winner/loser, the target written x0 − ε."""
    setup, batches, step, rec, seen = _micro(tiny_models, pairs, tmp_path, "sd3", monkeypatch)
    with torch.no_grad():  # move the LoRA away from zero so policy and reference differ
        for n, p in setup.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    terms = step(batches[0])
    ref_call, pol_call = rec.calls  # reference first (adapters off), then the policy
    x0 = seen["latents"]
    b = x0.shape[0] // 2
    t = pol_call["timestep"]
    assert torch.equal(t[:b], t[b:]) and torch.equal(t, ref_call["timestep"])
    sigma = (t / 1000.0).view(-1, 1, 1, 1)  # SD3 is called with timesteps = σ·1000
    eps = (pol_call["hidden_states"] - (1 - sigma) * x0) / sigma
    assert torch.allclose(eps[:b], eps[b:], atol=1e-4)
    target = eps - x0
    mse = lambda p: ((p - target) ** 2).flatten(1).mean(1)  # noqa: E731
    lp, lr = mse(pol_call["pred"]), mse(ref_call["pred"])
    margin = -2000 / 2 * ((lp[:b] - lr[:b]) - (lp[b:] - lr[b:]))  # chosen = first half of the batch
    assert torch.allclose(terms.margin, margin, rtol=1e-3, atol=1e-3)
    assert terms.margin.abs().max() > 1e-3  # the check above is not 0 == 0


def test_each_image_of_a_pair_draws_its_vae_sample_from_its_own_seed(tiny_models, pairs, tmp_path, monkeypatch):
    """The chosen and the rejected image share ε and σ, never their VAE sample: each image's generator is
    seeded by (seed, "vae", tag, pair, side), the same on a resume."""
    from richpref.training.data import seed_for

    _, batches, step, _, seen = _micro(tiny_models, pairs, tmp_path, "sd3", monkeypatch)
    batch = batches[0]
    step(batch)
    positions = batch["positions"].tolist()
    assert [g.initial_seed() for g in seen["generators"]] == [seed_for(0, "vae", "noise", p, side)
                                                               for side in (0, 1) for p in positions]
    assert len({g.initial_seed() for g in seen["generators"]}) == 2 * len(positions)


def test_reference_is_the_transformer_with_adapters_off_and_never_trains(tiny_models, pairs, tmp_path, monkeypatch):
    """Catches a reference that trains (or that runs with the adapters on)."""
    setup, batches, step, rec, _ = _micro(tiny_models, pairs, tmp_path, "flux", monkeypatch)
    params = [p for p in setup.model.parameters() if p.requires_grad]
    names = [n for n, p in setup.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    opt = torch.optim.SGD(params, lr=1.0)
    first = step(batches[0])
    assert first.loss.item() == pytest.approx(math.log(2), abs=1e-5)  # gaussian LoRA init: B = 0, policy = reference
    first.loss.backward()
    opt.step()
    rec.calls.clear()
    second = step(batches[0])
    ref_call, pol_call = rec.calls
    inputs = {k: v for k, v in ref_call.items() if k != "pred"}
    setup.model.disable_adapters()  # the public switch: the base transformer
    with torch.no_grad():
        base = setup.model(**inputs)[0]
    setup.model.enable_adapters()
    assert torch.allclose(ref_call["pred"], base, atol=1e-6)  # reference == base transformer
    assert not torch.allclose(pol_call["pred"], base, atol=1e-4)  # the policy has moved
    assert second.ref_loss.item() == pytest.approx(first.ref_loss.item(), rel=1e-6)
    assert second.loss.item() != pytest.approx(math.log(2), abs=1e-4)


def test_flux_gets_packed_tokens_ids_and_guidance(tiny_models, pairs, tmp_path, monkeypatch):
    _, batches, step, rec, seen = _micro(tiny_models, pairs, tmp_path, "flux", monkeypatch)
    step(batches[0])
    call = rec.calls[-1]
    b, c, h, w = seen["latents"].shape
    assert call["hidden_states"].shape == (b, (h // 2) * (w // 2), 4 * c)
    assert call["img_ids"].shape == ((h // 2) * (w // 2), 3) and call["img_ids"][-1].tolist() == [0, h // 2 - 1, w // 2 - 1]
    assert torch.all(call["guidance"] == 3.5) and torch.all((call["timestep"] > 0) & (call["timestep"] <= 1))
    assert call["encoder_hidden_states"].shape[1] == 16  # the cached T5 sequence at max_sequence_length


def test_edit_region_mask_reaches_the_loss(tiny_models, tmp_path, monkeypatch):
    data = write_brightness_pairs(tmp_path / "masked.parquet", 8, masks=True)
    _, batches, step, _, _ = _micro(tiny_models, data, tmp_path, "qwen-image", monkeypatch, loss_mask="edit_region",
                                    mask_floor=0.0)
    batch = batches[0]
    assert batch["masks"].shape == (2, 1, 32, 32) and batch["masks"][:, :, :15].min() == 1
    assert batch["masks"][:, :, 17:].max() == 0
    assert step(batch).loss.item() == pytest.approx(math.log(2), abs=1e-5)


def test_learns_a_toy_preference_on_held_out_pairs(tiny_models, pairs, tmp_path):
    """A few dozen steps on the tiny SD3 transformer: the brighter image preferred. Held-out implicit
    accuracy (pairs never trained on) rises above 0.6; the LoRA loads into the pipeline and changes it."""
    from diffusers import StableDiffusion3Pipeline

    from richpref.training.train import train

    out = tmp_path / "run"
    cfg = flow_config(tiny_models, pairs, max_train_steps=40, heldout_fraction=0.25, eval_every=20, heldout_draws=4)
    meta = train(cfg, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    held = [r for r in rows if r.get("kind") == "heldout"]
    assert [r["step"] for r in held] == [20, 40]
    assert held[-1]["heldout_implicit_acc"] > 0.6 and held[-1]["heldout_reward_margin"] > 0
    assert meta["arch"] == "sd3" and meta["last_metrics"]["heldout_implicit_acc"] == held[-1]["heldout_implicit_acc"]
    assert (out / "heldout.png").exists() and list((out / "text_embeds").glob("sd3-*/embeds-00-00000.safetensors"))

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_models / "sd3")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=16)
    before = pipe("a photo of object 1", generator=torch.Generator().manual_seed(0), **kw).images[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a LoRA whose keys the loader skips warns
        pipe.load_lora_weights(str(out / "final"))
    after = pipe("a photo of object 1", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert np.abs(after - before).mean() > 1e-4


def test_flux_lora_loads_into_the_flux_pipeline(tiny_models, pairs, tmp_path):
    from diffusers import FluxPipeline

    from richpref.training.train import train

    out = tmp_path / "flux"
    train(flow_config(tiny_models, pairs, "flux", max_train_steps=2), out)
    pipe = FluxPipeline.from_pretrained(tiny_models / "flux")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=16)
    before = pipe("a photo", generator=torch.Generator().manual_seed(0), **kw).images[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.load_lora_weights(str(out / "final"))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    after = pipe("a photo", generator=torch.Generator().manual_seed(0), **kw).images[0]
    assert np.abs(after - before).mean() > 1e-5


def test_a_flow_dpo_run_resumed_from_its_checkpoint_trains_as_if_never_stopped(tiny_models, pairs, tmp_path):
    # the LoRA, its optimizer, the data position and the noise and sigma draws all come back from checkpoint-2
    from safetensors.torch import load_file

    from richpref.training.train import train

    def run(out, steps):
        return train(flow_config(tiny_models, pairs, "flux", max_train_steps=steps, checkpointing_steps=2,
                                 train_batch_size=2), out)

    run(tmp_path / "whole", 4)
    run(tmp_path / "parts", 2)
    run(tmp_path / "parts", 4)  # trained longer: resumes from checkpoint-2
    whole, parts = (metrics_of(tmp_path / d) for d in ("whole", "parts"))
    assert [r.get("resumed_from") for r in parts if r["step"] > 2] == [2, 2]
    later = [r for r in parts if r["step"] > 2]
    assert [r["step"] for r in whole] == [1, 2, 3, 4] and [r["step"] for r in later] == [3, 4]
    for a, b in zip(whole[2:], later):
        for key in ("loss", "implicit_acc", "reward_margin", "grad_norm", "samples_seen"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
    final = [load_file(tmp_path / d / "final" / "pytorch_lora_weights.safetensors") for d in ("whole", "parts")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.allclose(final[0][k], final[1][k], atol=1e-7) for k in final[0])


def metrics_of(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r and "step" in r]


def test_captions_are_encoded_before_the_transformer_loads(tiny_models, pairs, tmp_path, monkeypatch):
    # before, the text encoders (T5-XXL, Qwen2.5-VL-7B) loaded beside the transformer and its training state
    from richpref.training import setup, text_cache
    from richpref.training.train import train

    loaded = []
    load_parts, pipeline_class = setup.load_flow_parts, text_cache.pipeline_class
    monkeypatch.setattr(setup, "load_flow_parts", lambda *a, **k: loaded.append("transformer") or load_parts(*a, **k))
    monkeypatch.setattr(text_cache, "pipeline_class", lambda arch: loaded.append("text encoders") or pipeline_class(arch))
    train(flow_config(tiny_models, pairs, "qwen-image", max_train_steps=1), tmp_path / "out")
    assert loaded == ["text encoders", "transformer"]


def test_a_config_without_a_flow_section_trains_a_flow_checkpoint_with_the_flow_defaults(tiny_models, pairs, tmp_path):
    # preflight reads the family (arch auto); before, the step read the missing section and crashed
    from richpref.training.train import train

    meta = train(flow_config(tiny_models, pairs, "sd3", flow=None, max_train_steps=1), tmp_path / "out")
    assert meta["arch"] == "sd3" and meta["steps"] == 1


# --- refused before training -----------------------------------------------------------------------

def test_configs_for_another_family_are_refused_naming_the_fix(tiny_models, pairs, tmp_path, monkeypatch):
    from richpref.training import setup as setup_mod
    from richpref.training.flow_models import ArchMismatch
    from richpref.training.setup import preflight

    with pytest.raises(ArchMismatch, match=r"'sd15' is a sd15 UNet checkpoint.*remove `flow`"):
        preflight(flow_config(tiny_models, pairs, "sd15"))
    with pytest.raises(ArchMismatch, match=r"'flux' is a flux checkpoint but the config says arch: sdxl"):
        preflight(flow_config(tiny_models, pairs, "flux", flow=None, arch="sdxl"))
    with pytest.raises(ArchMismatch, match=r"'sd15' is a sd15 checkpoint but the config says arch: qwen_image"):
        preflight(flow_config(tiny_models, pairs, "sd15", flow=None, arch="qwen_image"))
    assert preflight(flow_config(tiny_models, pairs, "flux", flow=None)) == "flux"  # arch auto: read, not assumed
    # more prompt tokens than the family's pipeline samples with (before: trained, on T5 tokens no sampler gives)
    for model, limit in (("flux", 512), ("sd3", 512), ("qwen-image", 1024)):
        with pytest.raises(ValueError, match=rf"^flow.max_sequence_length {limit + 1}: .* at most {limit} prompt tokens"):
            preflight(flow_config(tiny_models, pairs, model, flow={"max_sequence_length": limit + 1}))
        assert preflight(flow_config(tiny_models, pairs, model, flow={"max_sequence_length": limit}))
    # a side the latent grid does not tile (before: trained, on crops the VAE and the 2x2 patches cut short)
    with pytest.raises(ValueError, match=r"^resolution 40: flux_dev models take sides in multiples of 16; set it to 32 or 48$"):
        preflight(flow_config(tiny_models, pairs, "flux", resolution=40))
    with pytest.raises(ValueError, match=r"^resolution 36: sd15 models take sides in multiples of 8; set it to 32 or 40$"):
        preflight(flow_config(tiny_models, pairs, "sd15", flow=None, resolution=36))

    # a full fine-tune of a 12B+ transformer (the tiny one stands in with the threshold lowered)
    monkeypatch.setattr(setup_mod, "BIG_TRANSFORMER", 1)
    with pytest.raises(ArchMismatch, match=r"use mode: lora.*fsdp: true and gradient_checkpointing: true"):
        preflight(flow_config(tiny_models, pairs, "flux", mode="full"))
    assert preflight(flow_config(tiny_models, pairs, "flux", mode="full", fsdp=True, gradient_checkpointing=True)) == "flux"

    # edit_region on pairs without edit masks
    with pytest.raises(ValueError, match=r"no file of data source\(s\) \['pairs'\] has an 'edit_mask' column.*set loss_mask: none"):
        preflight(flow_config(tiny_models, pairs, "flux", loss_mask="edit_region"))


def test_lora_keys_of_another_base_are_refused():
    from richpref.training.flow_models import ArchMismatch, lora_base_check

    with pytest.raises(ArchMismatch, match=r"holds \['unet'\] weights, not transformer weights of a flux model"):
        lora_base_check(None, {"unet.down_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1)}, "flux", "old.safetensors")
    lora_base_check(None, {"transformer.x.lora_A.weight": torch.zeros(1)}, "flux", "ok.safetensors")


def test_chance_warning():
    from richpref.training.heldout import chance_warning

    assert "held-out implicit accuracy stays near 0.5" in chance_warning([0.69, 0.6, 0.5, 0.4], [0.5, 0.52, 0.48])
    assert chance_warning([0.69, 0.6, 0.5, 0.4], [0.5, 0.7, 0.75]) is None  # it generalises
    assert chance_warning([0.69, 0.69, 0.68], [0.5, 0.5]) is None  # the loss did not fall


def test_unet_dpo_edit_region_all_ones_equals_unmasked(tiny_models, tmp_path):
    from richpref.training.data import Augment, PairBatches, PairMixture, load_sources
    from richpref.training.models import AdapterSwitch
    from richpref.training.setup import setup_model
    from richpref.training.unet_step import dpo_micro_step

    data = write_brightness_pairs(tmp_path / "m.parquet", 4, masks=True)
    cfg = flow_config(tiny_models, data, "sd15", flow=None, resolution=64, loss_mask="edit_region", mask_floor=1.0)
    s = setup_model(cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for n, p in s.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    sources, _ = load_sources(cfg.data, need_mask=True)
    batch = PairBatches(sources, PairMixture([4], [1.0], 0), Augment(64), 2, masks=True)[0]
    args = (s.parts, s.model, s.model, AdapterSwitch(s.model))
    floor_one = dpo_micro_step(batch, *args, cfg, device=torch.device("cpu"))  # floor 1: every weight is 1
    plain = dpo_micro_step(batch, *args, cfg.model_copy(update={"loss_mask": "none"}), device=torch.device("cpu"))
    assert torch.allclose(floor_one.margin, plain.margin, rtol=1e-4, atol=1e-5) and plain.margin.abs().max() > 0
    half = dpo_micro_step(batch, *args, cfg.model_copy(update={"mask_floor": 0.0}), device=torch.device("cpu"))
    assert not torch.allclose(half.margin, plain.margin)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine may run FSDP")
def test_fsdp_without_cuda_is_refused_before_launch_and_in_the_trainer(tiny_models, pairs, tmp_path):
    """accelerate (1.16) runs FSDP on GPUs only: on CPU its plugin refuses sync_module_states, and without
    it the processes run unsharded data parallelism. `fsdp: true` there is refused, not silently unsharded."""
    from richpref.training.checkpoints import TrainingError
    from richpref.training.launcher import launch_training
    from richpref.training.train import train

    cfg = flow_config(tiny_models, pairs, "flux", mode="full", fsdp=True, gradient_checkpointing=True)
    with pytest.raises(ValueError, match=r"fsdp: true, but this machine has no CUDA device.*use mode: lora"):
        launch_training(cfg, tmp_path / "launched", num_processes=2)
    assert not (tmp_path / "launched").exists()  # refused before anything was written or started
    with pytest.raises(TrainingError, match=r"fsdp: true, but accelerate set up NO, not FSDP.*mode: lora"):
        train(cfg, tmp_path / "direct")


def test_unet_config_hashes_unchanged_by_the_new_options():
    """Finished runs and checkpoints of UNet configs made before Flow-DPO still match their config
    (hashes computed with the code of commit 2269300)."""
    from richpref.schemas.training import finetune_config_hash, load_finetune_config

    assert [finetune_config_hash(load_finetune_config(n, [])) for n in ("finetune-tiny", "finetune-sdxl-lora")] == \
        ["6c431cad536f8d88", "a01870a1d329b642"]
