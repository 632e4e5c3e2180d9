"""The sample stage (richpref/tasks/sample.py): the dataset's image kept as is (bad ones rejected with
a reason), SD1.5 and SDXL generation seeded per item, the generator's settings from the profile."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from image_helpers import _png, _seed_by_hand, encoded
from richpref.models.runtime import resident
from richpref.models.tiny import LAYOUT
from richpref.schemas.config import SampleConfig, SourceConfig
from richpref.schemas.tables import PROMPTS, SAMPLES, rows_to_table
from richpref.run.shard_contract import check_rows_accounted
from richpref.tasks.sample import load_generator, sample_rows
from richpref.tasks.source import shard_source
from test_bad_inputs import IMAGES


def test_sample_keeps_the_dataset_image(pickapic):
    [shard] = shard_source(SourceConfig(kind="parquet", path=str(pickapic.path), pickapic_preferred=True))
    rows = shard.filter(pc.equal(shard.column("status"), "ok"))

    def no_generator():
        raise AssertionError("dataset images must not load a generator")

    out = sample_rows(rows, SampleConfig(use_dataset_image=True), no_generator).to_pylist()
    assert [r["origin"] for r in out] == ["dataset"] * 2
    assert [r["image"] for r in out] == rows.column("image").to_pylist()  # the bytes, untouched
    assert {(r["width"], r["height"]) for r in out} == {(48, 40)}
    assert all(r["seed"] is None and r["model_id"] is None for r in out)


def _prompt_rows(prompts: list[str], prefix: str = "item") -> pa.Table:
    return rows_to_table([{"item_id": f"{prefix}{i}", "status": "ok", "reason": None, "prompt": p}
                          for i, p in enumerate(prompts)], PROMPTS)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_sample_generates_seeded_per_item(model, paths, release_resident):
    cfg = SampleConfig(model=model, steps=2, guidance_scale=5.0, height=64, width=64, batch_size=4, seed=11,
                       device="cpu", dtype="float32")
    rows = _prompt_rows(["a red cube", "a green hill", "a city at night"])
    get = lambda: load_generator(cfg, str(paths.root))  # noqa: E731
    first = sample_rows(rows, cfg, get)
    again = sample_rows(rows, cfg, get)
    assert first.schema == SAMPLES
    assert first.column("image").to_pylist() == again.column("image").to_pylist()  # rerun: same bytes
    for r in first.to_pylist():
        assert r["status"] == "ok" and r["origin"] == "generated"
        assert r["seed"] == _seed_by_hand(11, r["item_id"])
        assert r["model_id"].endswith(LAYOUT[model])
        assert (r["width"], r["height"]) == (64, 64) == _png(r["image"]).size
    reseeded = sample_rows(rows, cfg.model_copy(update={"seed": 12}), get).column("image").to_pylist()
    assert all(a != b for a, b in zip(reseeded, first.column("image").to_pylist()))


def test_sample_settings_come_from_the_profile(paths, release_resident):
    cfg = SampleConfig(model="sdxl", scheduler="DDIMScheduler", device="cpu", dtype="float32")
    gen = load_generator(cfg, str(paths.root))
    assert type(gen.pipe.scheduler).__name__ == "DDIMScheduler"
    assert gen.device.type == "cpu" and gen.pipe.unet.dtype.is_floating_point and str(gen.pipe.unet.dtype) == "torch.float32"
    assert resident.get(("generator", str(paths.sdxl), "DDIMScheduler", "cpu", "float32"), lambda: None) is gen


def test_sample_stage_rejects_bad_dataset_images_with_reasons_and_keeps_the_rest():
    rows = [{"item_id": f"i{k}", "status": "ok", "reason": None, "source": "t", "source_row": k,
             "prompt": "a cat", "image": data} for k, (data, _) in enumerate(IMAGES.values())]
    table = rows_to_table(rows, PROMPTS)

    def no_generator():
        raise AssertionError("dataset images must not load a generator")

    # Several of these decode to one flat colour: flat images have their own test below.
    out = sample_rows(table, SampleConfig(use_dataset_image=True, min_image_std=0), no_generator)
    check_rows_accounted("sample", 0, table, out)
    got = {r["item_id"]: r for r in out.to_pylist()}
    for k, (name, (_, expected)) in enumerate(IMAGES.items()):
        r = got[f"i{k}"]
        assert (r["status"] == "ok") == (expected is None), name
        if expected:
            assert r["reason"].startswith("bad_image"), (name, r["reason"])


def test_flat_dataset_images_are_rejected_with_a_reason():
    from PIL import Image

    flat = encoded(Image.new("RGB", (32, 32), (0, 0, 0)))
    almost = np.zeros((32, 32, 3), np.uint8)
    almost[0, 0] = 3  # one pixel off black: still flat
    varied = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    images = [flat, encoded(Image.fromarray(almost)), encoded(Image.fromarray(varied))]
    table = rows_to_table([{"item_id": f"i{k}", "status": "ok", "reason": None, "source": "t", "source_row": k,
                            "prompt": "a cat", "image": data} for k, data in enumerate(images)], PROMPTS)
    out = sample_rows(table, SampleConfig(), lambda: None).to_pylist()
    assert [r["status"] for r in out] == ["rejected", "rejected", "ok"]
    assert all(r["reason"].startswith("flat_image: pixel std") for r in out[:2])
    # 0 turns the check off
    assert [r["status"] for r in sample_rows(table, SampleConfig(min_image_std=0), lambda: None).to_pylist()] == ["ok"] * 3


@pytest.fixture(scope="module")
def sd15_with_safety_checker(paths, tmp_path_factory):
    """The tiny SD 1.5 with a real (tiny, random) StableDiffusionSafetyChecker whose thresholds flag
    every image, saved as a pipeline that lists it in model_index.json, as SD 1.5's release does."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # a threshold of -2 is below any cosine similarity: every concept fires
        checker.concept_embeds_weights.fill_(-2.0)
        checker.special_care_embeds_weights.fill_(-2.0)
    base = StableDiffusionPipeline.from_pretrained(str(paths.sd15))
    pipe = StableDiffusionPipeline(**{**base.components, "safety_checker": checker,
                                      "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32},
                                                                              crop_size={"height": 32, "width": 32})},
                                   requires_safety_checker=True)
    out = tmp_path_factory.mktemp("sd15-checker") / "sd15-checker"
    pipe.save_pretrained(out, safe_serialization=True)
    assert "safety_checker" in json.loads((out / "model_index.json").read_text())
    return out


def test_safety_checker_is_off_by_default_and_its_black_images_are_rejected(sd15_with_safety_checker, release_resident):
    cfg = SampleConfig(model=str(sd15_with_safety_checker), steps=2, guidance_scale=5.0, height=64, width=64,
                       batch_size=2, device="cpu", dtype="float32")
    rows = _prompt_rows(["a robot tiger", "a red cube"])
    default = sample_rows(rows, cfg, lambda: load_generator(cfg, None)).to_pylist()
    assert [r["status"] for r in default] == ["ok", "ok"]
    assert all(np.asarray(_png(r["image"])).std() > 1.0 for r in default)  # not black
    assert load_generator(cfg, None).pipe.safety_checker is None

    on = cfg.model_copy(update={"safety_checker": True})
    gen = load_generator(on, None)
    assert gen.pipe.safety_checker is not None
    black = gen.generate(["a robot tiger"], [0], steps=2, guidance_scale=5.0, height=64, width=64)[0]
    assert np.asarray(black).max() == 0  # the checker flagged it
    out = sample_rows(rows, on, lambda: load_generator(on, None)).to_pylist()
    assert [r["status"] for r in out] == ["rejected", "rejected"]
    assert all(r["reason"].startswith("flat_image:") for r in out)
