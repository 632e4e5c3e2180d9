"""Editors edit at their checkpoint's native resolution (`edit.resolution`), and the pair's two images
leave at one size and one encoding; Qwen-Image-Edit sizes its output as its pipeline sizes the
conditioning image."""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from richpref.models.editors.common import resolution_size, round_area_size, unet_native_side
from richpref.models.editors.flux_kontext import kontext_size
from richpref.schemas.config import EditConfig, load_profile

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pipe(sample_size: int) -> SimpleNamespace:
    return SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=sample_size)), vae_scale_factor=8)


def test_native_sides_of_the_unet_checkpoints():
    assert unet_native_side(_pipe(64), "stable-diffusion-v1-5/stable-diffusion-v1-5") == 512
    assert unet_native_side(_pipe(64), "timbrooks/instruct-pix2pix") == 512
    assert unet_native_side(_pipe(128), "stabilityai/stable-diffusion-xl-base-1.0") == 1024
    assert unet_native_side(_pipe(128), "diffusers/sdxl-instructpix2pix-768") == 768


def test_a_1000x667_original_gets_each_editors_native_size():
    size = (1000, 667)
    assert resolution_size(size, "native", 512 * 512, 8) == (624, 416)  # SD 1.5, aspect kept
    assert resolution_size(size, "native", 1024 * 1024, 8) == (1256, 840)  # SDXL
    assert resolution_size(size, "native", 768 * 768, 8) == (944, 624)  # SDXL InstructPix2Pix 768
    assert kontext_size(size, 1024 * 1024, 16) == (1248, 832)  # Kontext's preferred 3:2 resolution
    assert resolution_size(size, "keep", 512 * 512, 8) == (1000, 664)
    assert resolution_size(size, 256, 512 * 512, 8) == (312, 208)
    with pytest.raises(ValueError, match="edit.resolution"):
        resolution_size(size, "big", 512 * 512, 8)


def test_resolution_is_a_validated_setting_of_every_kind():
    assert EditConfig().resolution == "native" and EditConfig(resolution="768").resolution == 768
    assert EditConfig(kind="flux_kontext", resolution="keep").resolution == "keep"
    with pytest.raises(ValueError):
        EditConfig(resolution="huge")
    with pytest.raises(ValueError):
        EditConfig(resolution=16)


@pytest.mark.parametrize("size", [(1920, 1080), (1080, 1920), (1000, 667), (64, 64), (1024, 1024), (3000, 1000)])
def test_qwen_image_edit_works_at_the_size_its_pipeline_conditions_on(size):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    from richpref.models.editors.qwen_image_edit import QwenImageEditor

    editor = QwenImageEditor(SimpleNamespace(vae_scale_factor=8), "qwen", None, None)
    work = editor.working_size(size, max_area=1024 * 1024)
    assert work == calculate_dimensions(1024 * 1024, size[0] / size[1])[:2]
    assert round_area_size(size, 1024 * 1024, 32) == work
    if size == (1920, 1080):
        assert work == (1376, 768)  # 16:9: the pipeline's 1376 x 768, not 1344 x 768


def test_a_1000x667_original_is_edited_at_the_editors_size_and_the_pair_leaves_at_one_size(tiny_models):
    from richpref.tasks.pair_images import pair_images, pair_quality
    from richpref.tasks.edit import edit_rows, load_editor

    cfg = load_profile("tiny", ["edit.device=cpu", "edit.dtype=float32", "edit.steps=2"]).edit
    editor = load_editor(cfg, str(tiny_models))
    assert unet_native_side(editor.pipe, editor.model_id.split("+")[0]) == 64  # the tiny UNet: 8 x 8
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (667, 1000, 3), dtype=np.uint8))
    buf = io.BytesIO()
    original.save(buf, format="JPEG", quality=88)
    rows = pa.table({"item_id": ["a"], "prompt": ["a cat"], "instructions": [["make it red"]]})
    row = edit_rows(rows, [buf.getvalue()], cfg, lambda: editor).to_pylist()[0]
    assert (row["width"], row["height"]) == editor.working_size((1000, 667)) == (80, 56)
    assert row["status"] == "ok", row["reason"]  # the seeded tiny editor keeps this edit
    assert Image.open(io.BytesIO(row["image"])).size == (80, 56)
    for fmt, pil in (("png", "PNG"), ("jpeg", "JPEG")):
        a, b = pair_images(buf.getvalue(), row["image"], image_format=fmt, quality=pair_quality(buf.getvalue(), None))
        ia, ib = Image.open(io.BytesIO(a)), Image.open(io.BytesIO(b))
        assert ia.size == ib.size == (80, 56) and ia.format == ib.format == pil
    other = edit_rows(rows, [buf.getvalue()], cfg.model_copy(update={"resolution": 128}), lambda: editor).to_pylist()[0]
    assert (other["width"], other["height"]) == (160, 104)
