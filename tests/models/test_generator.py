"""Diffusion settings: scheduler choice (in the cache key), fp16 weight variants, channels_last and
torch.compile (runtime only), on the tiny SD1.5 model."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from richpref.common.images import encode_png
from richpref.models.generator import TextToImage
from richpref.models.runtime import resident
from richpref.schemas.config import EditConfig, SampleConfig, config_hash

GEN = dict(steps=3, guidance_scale=5.0, height=64, width=64)


def test_scheduler_and_variant_are_in_the_key_compile_and_layout_are_not():
    base = SampleConfig()
    assert config_hash(SampleConfig(compile=True, channels_last=True)) == config_hash(base)
    assert config_hash(SampleConfig(scheduler="unipc")) != config_hash(base)
    assert config_hash(SampleConfig(variant="fp16")) != config_hash(base)
    assert config_hash(EditConfig(scheduler="dpmsolver++")) != config_hash(EditConfig())
    assert config_hash(EditConfig(compile=True, channels_last=True)) == config_hash(EditConfig())
    # Unset, the new fields leave earlier keys as they were: the sample key is still the hash of the
    # fields it always had (scheduler included; safety_checker and min_image_std since sample v2), the
    # edit key never saw a scheduler; variant and max_sequence_length count only when set.
    old = {k: v for k, v in base.model_dump(mode="json").items()
           if k not in ("batch_size", "device", "dtype", "compile", "channels_last", "variant", "max_sequence_length",
                        "num_samples")}
    assert config_hash(base) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert "scheduler" not in EditConfig().model_dump(exclude={"scheduler"})


def test_unknown_scheduler_fails_in_the_config():
    with pytest.raises(ValueError, match="unipc"):
        SampleConfig(scheduler="fastest")
    assert SampleConfig(scheduler="UniPCMultistepScheduler").scheduler == "UniPCMultistepScheduler"


def test_scheduler_aliases_load_and_change_the_images(tiny_models):
    sd = str(tiny_models / "sd15")
    plain = TextToImage.load(sd, device="cpu")
    unipc = TextToImage.load(sd, device="cpu", scheduler="unipc")
    dpm = TextToImage.load(sd, device="cpu", scheduler="dpmsolver++")
    assert type(unipc.pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert type(dpm.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert dpm.pipe.scheduler.config.algorithm_type == "dpmsolver++"
    a, b = (g.generate(["a red cube"], [7], **GEN)[0] for g in (plain, unipc))
    assert encode_png(a) != encode_png(b)


def test_channels_last_and_compile_keep_the_computation(tiny_models):
    sd = str(tiny_models / "sd15")
    plain = TextToImage.load(sd, device="cpu").generate(["a red cube"], [7], **GEN)[0]
    cl = TextToImage.load(sd, device="cpu", channels_last=True)
    assert cl.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    diff = np.abs(np.asarray(plain, dtype=np.int16) - np.asarray(cl.generate(["a red cube"], [7], **GEN)[0], dtype=np.int16))
    assert diff.max() <= 1
    compiled = TextToImage.load(sd, device="cpu", compile=True)
    assert type(compiled.pipe.unet).__name__ == "OptimizedModule"  # compiled lazily, on its first call


def test_fp16_variant_loads_the_variant_files(tiny_models, tmp_path):
    from diffusers import DiffusionPipeline

    repo = tmp_path / "sd15"
    DiffusionPipeline.from_pretrained(str(tiny_models / "sd15")).save_pretrained(repo)
    DiffusionPipeline.from_pretrained(str(tiny_models / "sd15"), dtype=torch.float16).save_pretrained(repo, variant="fp16")
    assert (repo / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    gen = TextToImage.load(str(repo), device="cpu", dtype="float32", variant="fp16")
    plain = TextToImage.load(str(repo), device="cpu", dtype="float32")
    w16 = gen.pipe.unet.conv_in.weight
    # The variant's weights are the float32 ones rounded to float16.
    assert torch.equal(w16, plain.pipe.unet.conv_in.weight.half().float())


def test_edit_stage_takes_the_scheduler(tiny_models):
    from richpref.tasks.edit import load_editor

    cfg = EditConfig(model="sd15", controlnet="controlnet-canny", scheduler="unipc", device="cpu")
    try:
        editor = load_editor(cfg, str(tiny_models))
        assert type(editor.pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    finally:
        resident.release()


def test_doctor_names_a_missing_variant(tiny_models, tmp_path):
    from richpref.doctor.checks import ModelProblem, preflight, resolve_models
    from richpref.schemas.config import load_profile

    profile = load_profile("tiny", ["sample.variant=fp16"], str(tiny_models))
    with pytest.raises(ModelProblem, match="no 'fp16' weight files") as info:
        preflight(profile)
    assert "sample.variant=null" in info.value.fix
    with_fp16 = tmp_path / "sd15"  # the same pipeline with its fp16 variant files beside the plain ones
    shutil.copytree(tiny_models / "sd15", with_fp16)
    for f in with_fp16.rglob("diffusion_pytorch_model.safetensors"):
        shutil.copy(f, f.with_name("diffusion_pytorch_model.fp16.safetensors"))
    resolve_models(load_profile("tiny", ["sample.variant=fp16", f"sample.model={with_fp16}"], str(tiny_models)), {"sample"})


def test_the_preflight_refuses_more_prompt_tokens_than_the_samplers_family_takes(tiny_models):
    # before: the sample stage's first shard failed once the model had loaded
    from richpref.doctor.checks import resolve_models
    from richpref.schemas.config import ProfileError, load_profile

    with pytest.raises(ProfileError, match=r"^sample.max_sequence_length 513: flux_dev models take at most 512 .*'flux'"):
        resolve_models(load_profile("tiny-flux", ["sample.max_sequence_length=513"], str(tiny_models)))
    resolve_models(load_profile("tiny-flux", ["sample.max_sequence_length=512"], str(tiny_models)), {"sample"})


def test_loading_a_pipeline_shows_its_bar_only_where_progress_bars_are_on(tiny_models, monkeypatch, capfd):
    """richpref's commands set HF_HUB_DISABLE_PROGRESS_BARS=1 (the user's env wins); diffusers does not
    read it, so each model load printed "Loading pipeline components..." into the run's output."""
    from diffusers.utils import logging as diffusers_logging

    was_on = diffusers_logging.is_progress_bar_enabled()
    try:
        for value, shown in (("0", True), ("1", False)):
            diffusers_logging.enable_progress_bar()  # as in a fresh process
            monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", value)
            capfd.readouterr()
            TextToImage.load(str(tiny_models / "sd15"), device="cpu")
            assert ("Loading pipeline components" in capfd.readouterr().err) == shown, value
    finally:
        (diffusers_logging.enable_progress_bar if was_on else diffusers_logging.disable_progress_bar)()
