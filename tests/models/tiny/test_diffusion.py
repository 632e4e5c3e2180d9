"""The tiny SDXL (richpref/models/tiny/diffusion.py) and the image backends on it: the SDXL architecture,
seed-deterministic builders, seeded text-to-image, batch composition, ControlNet img2img. Runs
offline on CPU at 64×64 with 2-4 steps. The sample and edit stages on SDXL: tests/tasks/."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from image_helpers import EDIT, GEN, _arr, _scene
from richpref.common.images import encode_png
from richpref.models.editor import ControlNetEditor
from richpref.models.generator import TextToImage
from richpref.models.tiny.diffusion import build_tiny_sdxl, build_tiny_sdxl_controlnet


@pytest.fixture(scope="module")
def sdxl(paths):
    gen = TextToImage.load(str(paths.sdxl), device="cpu")
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def sdxl_editor(paths):
    ed = ControlNetEditor.load(str(paths.sdxl), str(paths.controlnet_sdxl), device="cpu")
    yield ed
    ed.close()


def test_tiny_sdxl_has_the_sdxl_architecture(paths):
    from diffusers import ControlNetModel, DiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = DiffusionPipeline.from_pretrained(str(paths.sdxl))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    # Cross-attention reads both encoders' hidden states side by side; the added embedding is the
    # pooled projection plus six time-embedded micro-conditioning numbers.
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    cn = ControlNetModel.from_pretrained(str(paths.controlnet_sdxl)).config
    assert cn.addition_embed_type == "text_time" and cn.cross_attention_dim == unet.cross_attention_dim


def test_tiny_sdxl_builders_are_seed_deterministic(paths, tmp_path):
    def weights(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*.safetensors"))}

    # build_tiny_models builds SDXL with seed 7 and its ControlNet with seed 8.
    same = build_tiny_sdxl(tmp_path / "same", seed=7)
    assert weights(same) == weights(paths.sdxl)
    other = build_tiny_sdxl(tmp_path / "other", seed=8)
    assert weights(other)["unet/diffusion_pytorch_model.safetensors"] != weights(same)["unet/diffusion_pytorch_model.safetensors"]
    cn = build_tiny_sdxl_controlnet(same, tmp_path / "cn", seed=8)
    assert weights(cn) == weights(paths.controlnet_sdxl)


def test_sdxl_text_to_image_is_seeded_and_sized(sdxl):
    a = sdxl.generate(["a red cube on a table"], [7], **GEN)
    b = sdxl.generate(["a red cube on a table"], [7], **GEN)
    assert a[0].size == (64, 64) and a[0].mode == "RGB"
    assert encode_png(a[0]) == encode_png(b[0])  # byte-identical rerun on CPU
    other_seed = sdxl.generate(["a red cube on a table"], [8], **GEN)[0]
    assert np.abs(_arr(a[0]) - _arr(other_seed)).mean() > 1.0
    assert sdxl.generate(["x"], [0], steps=2, guidance_scale=5.0, height=64, width=96)[0].size == (96, 64)


def test_sdxl_batch_composition(sdxl):
    prompts, seeds = ["a dog", "a red cube on a table", "a city at night"], [1, 7, 3]
    batch = sdxl.generate(prompts, seeds, batch_size=3, **GEN)
    again = sdxl.generate(prompts, seeds, batch_size=3, **GEN)
    # Same batch composition: byte-identical (what resume relies on).
    assert [encode_png(x) for x in batch] == [encode_png(x) for x in again]
    # Alone vs in a batch: the same per-item noise; batched CPU matmuls may round one level apart.
    alone = sdxl.generate([prompts[1]], [7], **GEN)[0]
    diff = np.abs(_arr(alone) - _arr(batch[1]))
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_sdxl_controlnet_edit(sdxl_editor):
    images = [_scene((64, 64)), _scene((70, 50), bg=(200, 60, 90))]
    out = sdxl_editor.edit(images, ["a blue ball", "a green ball"], [3, 4], **EDIT)
    again = sdxl_editor.edit(images, ["a blue ball", "a green ball"], [3, 4], **EDIT)
    assert type(sdxl_editor.pipe).__name__ == "StableDiffusionXLControlNetImg2ImgPipeline"
    assert [o.size for o in out] == [(64, 64), (70, 50)]
    for o, a, src in zip(out, again, images):
        assert encode_png(o) == encode_png(a)
        assert np.abs(_arr(o) - _arr(src)).mean() > 1.0
    tile = sdxl_editor.edit(images[:1], ["a blue ball"], [3], control="tile", **EDIT)[0]
    assert np.abs(_arr(tile) - _arr(out[0])).mean() > 0.5  # the control image steers the edit
