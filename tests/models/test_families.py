"""Flow-matching text-to-image models (SD3/SD3.5, FLUX.1, Qwen-Image): the tiny twins load through
TextToImage and generate reproducibly, the family comes from the checkpoint, each family gets its own
guidance arguments, a curate runs end to end on FLUX.1, evaluate takes a flow LoRA, and doctor names a
missing file of a pipeline folder without loading it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from richpref.models.families import (UnknownPipeline, call_kwargs, detect_checkpoint_family, round_size,
                                      size_multiple)
from richpref.models.generator import TextToImage

FLOW = {"sd3": ("StableDiffusion3Pipeline", "sd3"), "flux": ("FluxPipeline", "flux_dev"),
        "qwen_image": ("QwenImagePipeline", "qwen_image")}
GEN = dict(steps=2, guidance_scale=4.0, height=64, width=64, max_sequence_length=32)


@pytest.fixture(scope="module")
def flow_pipes(paths):
    """Each tiny flow pipeline loaded once for the module."""
    pipes = {key: TextToImage.load(str(getattr(paths, key)), device="cpu", dtype="float32") for key in FLOW}
    yield pipes
    for t2i in pipes.values():
        t2i.close()


def _arrays(images):
    return [np.asarray(im) for im in images]


@pytest.mark.parametrize("key", list(FLOW))
def test_each_tiny_flow_pipeline_loads_and_generates_reproducibly(key, flow_pipes, paths):
    t2i = flow_pipes[key]
    cls, family = FLOW[key]
    assert type(t2i.pipe).__name__ == cls and t2i.family == family == detect_checkpoint_family(getattr(paths, key))
    prompts, seeds = ["a red cube on a table", "two birds in the snow"], [3, 4]
    a = _arrays(t2i.generate(prompts, seeds, batch_size=2, **GEN))
    b = _arrays(t2i.generate(prompts, seeds, batch_size=2, **GEN))
    assert all(x.shape == (64, 64, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # same seeds: the same images
    assert not np.array_equal(a[0], _arrays(t2i.generate(prompts[:1], [5], **GEN))[0])  # another seed: another image
    if key == "qwen_image":  # the tiny tokenizer puts the prompt where the pipeline expects it, after the template
        prefix = t2i.pipe.prompt_template_encode.split("{}")[0]
        assert len(t2i.pipe.tokenizer(prefix).input_ids) == t2i.pipe.prompt_template_encode_start_idx == 34
    # A side the transformer cannot patch is rounded to the nearest one it can (multiples of 16).
    assert t2i.generate(prompts[:1], [3], **{**GEN, "height": 70, "width": 90})[0].size == (96, 64)


def test_family_is_read_from_the_checkpoint_and_an_unknown_pipeline_is_refused(paths, tmp_path):
    assert detect_checkpoint_family(paths.sd15) == "sd15" and detect_checkpoint_family(paths.sdxl) == "sdxl"
    # FLUX.1 [schnell]: the same pipeline class, a transformer without the guidance embedding.
    schnell = tmp_path / "schnell"
    shutil.copytree(paths.flux, schnell, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((schnell / "transformer" / "config.json").read_text())
    (schnell / "transformer" / "config.json").write_text(json.dumps({**cfg, "guidance_embeds": False}))
    assert detect_checkpoint_family(schnell) == "flux_schnell"
    # A pipeline richpref does not generate with fails before any weight loads, naming what it takes.
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "WuerstchenCombinedPipeline"}))
    with pytest.raises(UnknownPipeline, match="WuerstchenCombinedPipeline.*FluxPipeline"):
        TextToImage.load(str(other), device="cpu")


def test_guidance_arguments_are_routed_per_family():
    n = 2
    # FLUX.1 [dev]: guidance_scale feeds the distilled guidance embedding; no true CFG, no negative prompt.
    assert call_kwargs("flux_dev", guidance_scale=3.5, n=n, max_sequence_length=128) == {
        "guidance_scale": 3.5, "true_cfg_scale": 1.0, "max_sequence_length": 128}
    assert call_kwargs("flux_schnell", guidance_scale=3.5, n=n) == {"true_cfg_scale": 1.0}
    # Qwen-Image: true CFG, which the pipeline runs only with a negative prompt (" " when none is given).
    assert call_kwargs("qwen_image", guidance_scale=4.0, n=n) == {"true_cfg_scale": 4.0, "negative_prompt": [" ", " "]}
    assert call_kwargs("sd3", guidance_scale=5.0, n=n, negative_prompt="blurry") == {
        "guidance_scale": 5.0, "negative_prompt": ["blurry", "blurry"]}
    assert call_kwargs("sd15", guidance_scale=7.5, n=n) == {"guidance_scale": 7.5, "negative_prompt": None}
    with pytest.raises(ValueError, match="at most 256 prompt tokens"):
        call_kwargs("flux_schnell", guidance_scale=0.0, n=1, max_sequence_length=512)
    assert (size_multiple("flux_dev"), size_multiple("sd15")) == (16, 8) and round_size(70, 16) == 64


def test_the_guidance_reaches_the_pipeline(flow_pipes):
    """Through generate: FLUX.1 [dev]'s images change with the distilled guidance, Qwen-Image's with the
    true CFG scale (a second, negative pass), each from the arguments its pipeline call received."""
    for key in ("flux", "qwen_image"):
        t2i = flow_pipes[key]
        calls = []
        pipe = t2i.pipe

        def spy(*args, _pipe=pipe, **kwargs):
            calls.append(kwargs)
            return _pipe(*args, **kwargs)

        t2i.pipe = spy
        try:
            low = _arrays(t2i.generate(["a cat"], [1], **{**GEN, "guidance_scale": 1.5}))[0]
            high = _arrays(t2i.generate(["a cat"], [1], **{**GEN, "guidance_scale": 6.0}))[0]
        finally:
            t2i.pipe = pipe
        assert not np.array_equal(low, high), key
        if key == "flux":
            assert calls[1]["guidance_scale"] == 6.0 and calls[1]["true_cfg_scale"] == 1.0
            assert "negative_prompt" not in calls[1]
        else:
            assert calls[1]["true_cfg_scale"] == 6.0 and calls[1]["negative_prompt"] == [" "]
            assert "guidance_scale" not in calls[1]


def _flux_lora(paths, out):
    """A LoRA of the tiny FLUX.1 transformer with non-zero weights, saved as diffusers LoRA tools save it."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(paths.flux / "transformer")
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out


def test_evaluate_loads_a_flow_lora_over_its_base(paths, tmp_path):
    from richpref.training.evaluation import _generation_key, load_model
    from richpref.schemas.training import EvaluateConfig

    lora = _flux_lora(paths, tmp_path / "lora")
    cfg = EvaluateConfig.model_validate({
        "models_root": str(paths.root), "models": [{"name": "base", "path": "flux"},
                                                   {"name": "tuned", "path": "flux", "lora": str(lora)}],
        "rewards": {"clip": {"kind": "clip", "model": "clip"}}, "steps": 2, "height": 64, "width": 64,
        "guidance_scale": 3.5, "device": "cpu"})
    images = {}
    for model in cfg.models:
        t2i = load_model(model, cfg)
        try:
            images[model.name] = _arrays(t2i.generate(["a cat"], [1], steps=2, guidance_scale=3.5, height=64, width=64))[0]
        finally:
            t2i.close()
    assert not np.array_equal(images["base"], images["tuned"])
    assert _generation_key(cfg.models[0], ["a"], [1], cfg) != _generation_key(cfg.models[1], ["a"], [1], cfg)


def test_doctor_names_a_missing_file_of_a_flow_pipeline_offline(paths, tmp_path, monkeypatch):
    from richpref.doctor import checks as doctor_checks
    from richpref.doctor.checks import ModelProblem, preflight, weight_files
    from richpref.schemas.config import load_profile

    broken = tmp_path / "flux"
    shutil.copytree(paths.flux, broken)
    (broken / "flux1-dev.safetensors").write_bytes(b"")  # a single-file copy beside the folders: not counted
    assert all(f.parent.name != "flux" for f in weight_files(str(broken)))
    profile = load_profile("tiny-flux", [f"sample.model={broken}"], models_root=str(paths.root))
    refs, per_stage = preflight(profile)
    assert per_stage["sample"] > 0
    with monkeypatch.context() as m:  # too little memory: half precision is bfloat16 for FLUX.1 (float16 overflows)
        m.setattr(doctor_checks, "available_bytes", lambda device: 1024)
        with pytest.raises(ModelProblem, match=r"--set sample.dtype=bfloat16"):
            preflight(profile)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelProblem) as err:
        preflight(profile)
    assert "transformer/diffusion_pytorch_model.safetensors" in str(err.value) and "FluxTransformer2DModel" in str(err.value)
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ModelProblem, match="needs a transformer of class FluxTransformer2DModel"):
        preflight(profile)


def test_curate_runs_end_to_end_on_flux(runs_dir, tiny_models, prefect_harness):
    """`curate --profile tiny-flux` through the real runner: FLUX.1 [dev] draws, FLUX.1 Kontext edits."""
    from run_sizes import ONE_REWARD
    from test_curate_flow import assert_every_row_accounted

    from richpref.ops.entrypoints import CURATE, load_flow
    from richpref.run.storage import RunStore

    load_flow(CURATE)(profile="tiny-flux", run="flux", data_dir=str(runs_dir), models_root=str(tiny_models),
                      overrides=["source.limit=4", "source.shard_size=4", *ONE_REWARD])
    assert_every_row_accounted(runs_dir, "flux")
    run = RunStore(str(runs_dir), "flux")
    samples = run.read_stage("sample")
    assert samples.num_rows == 4 and {m.rsplit("/", 1)[-1] for m in samples.column("model_id").to_pylist()} == {"flux"}
    assert set(run.read_stage("edit").column("editor").to_pylist()) == {"flux_kontext"}
