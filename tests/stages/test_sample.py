"""The sample stage (richpref/tasks/sample.py): the dataset's image kept as is (bad ones rejected with
a reason), SD1.5 and SDXL generation seeded per item, the generator's settings from the profile."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from image_helpers import _png, _seed_by_hand
from richpref.models.runtime import resident
from richpref.models.tiny import LAYOUT
from richpref.schemas.config import SampleConfig, SourceConfig
from richpref.schemas.tables import PROMPTS, SAMPLES, rows_to_table
from richpref.shard_contract import check_rows_accounted
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

    out = sample_rows(table, SampleConfig(use_dataset_image=True), no_generator)
    check_rows_accounted("sample", 0, table, out)
    got = {r["item_id"]: r for r in out.to_pylist()}
    for k, (name, (_, expected)) in enumerate(IMAGES.items()):
        r = got[f"i{k}"]
        assert (r["status"] == "ok") == (expected is None), name
        if expected:
            assert r["reason"].startswith("bad_image"), (name, r["reason"])
