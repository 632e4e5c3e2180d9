"""Loading real reward checkpoints: ImageReward loads like its reference (`strict=False`): tensors the
model does not use are accepted and logged, missing weights are an error naming them."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from richpref.models.rewards import RewardLoadError, load_reward

PROMPTS = ["a red bicycle against a yellow wall", "three green apples"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in PROMPTS]


def _copy_with(tiny_models, tmp_path, change) -> str:
    root = tiny_models / "imagereward"
    sd = torch.load(root / "ImageReward.pt", weights_only=True)
    change(sd)
    torch.save(sd, tmp_path / "ImageReward.pt")
    shutil.copy(root / "med_config.json", tmp_path)
    return str(tmp_path)


def _load(path, tiny_models):
    root = tiny_models / "imagereward"
    return load_reward("imagereward", path, processor=str(root / "tokenizer"), device="cpu", dtype="float32")


def test_imagereward_ignores_tensors_it_does_not_use(tiny_models, tmp_path, caplog):
    extra = {
        "blip.text_decoder.cls.predictions.bias": torch.zeros(3),  # BLIP's decoder: not part of ImageReward
        "logit_scale": torch.zeros(()),
        "blip.visual_encoder.blocks.0.attn.rel_pos_h": torch.zeros(2),  # a vision tensor of no known name
        "blip.text_encoder.encoder.layer.0.extra.weight": torch.zeros(2),
        "mlp.layers.9.weight": torch.zeros(2, 2),
    }
    path = _copy_with(tiny_models, tmp_path, lambda sd: sd.update(extra))
    with caplog.at_level(logging.WARNING, logger="richpref"):
        reward = _load(path, tiny_models)
    assert sorted(reward.unused_keys) == sorted(extra)
    assert "5 checkpoint tensors unused" in caplog.text
    want = _load(str(tiny_models / "imagereward"), tiny_models).score(_images(), PROMPTS)
    np.testing.assert_array_equal(reward.score(_images(), PROMPTS), want)


@pytest.mark.parametrize("key,named", [
    ("blip.text_encoder.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
    ("blip.visual_encoder.blocks.0.mlp.fc1.bias", "encoder.layers.0.mlp.fc1.bias"),
    ("mlp.layers.7.bias", "layers.7.bias"),
])
def test_imagereward_fails_on_a_missing_weight_and_names_it(tiny_models, tmp_path, key, named):
    def drop(sd):
        assert key in sd
        del sd[key]

    path = _copy_with(tiny_models, tmp_path, drop)
    with pytest.raises(RewardLoadError, match=f"lacks 1 weights the model needs.*{named}"):
        _load(path, tiny_models)


def test_transformers_requirement_is_the_major_whose_apis_the_code_uses():
    """get_*_features(...).pooler_output and rope_parameters exist from transformers 5 on."""
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())
    [req] = [Requirement(r) for r in meta["project"]["dependencies"] if Requirement(r).name == "transformers"]
    assert not req.specifier.contains("4.57.1") and not req.specifier.contains("6.0.0")
    assert req.specifier.contains(version("transformers"))
