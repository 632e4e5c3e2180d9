"""Profiles that are another profile with its image models swapped (tiny-sdxl is tiny on the tiny SDXL,
sdxl-paper is sd15-paper on SDXL), and the tiny-sdxl profile curated end to end."""
from __future__ import annotations

import pyarrow as pa

from image_helpers import _png
from run_sizes import ONE_REWARD


def test_tiny_sdxl_profile_is_the_tiny_profile_with_sdxl_models():
    import yaml

    from richpref.schemas.config import find_profile

    tiny = yaml.safe_load(find_profile("tiny").read_text())
    sdxl = yaml.safe_load(find_profile("tiny-sdxl").read_text())
    assert (sdxl["sample"]["model"], sdxl["edit"]["model"], sdxl["edit"]["controlnet"]) == ("sdxl", "sdxl", "controlnet-sdxl")
    # Everything else follows the tiny profile: when tiny.yaml changes, change tiny-sdxl.yaml alike.
    sdxl["name"], sdxl["sample"]["model"] = tiny["name"], tiny["sample"]["model"]
    sdxl["description"] = tiny["description"]  # each says what it is
    sdxl["edit"]["model"], sdxl["edit"]["controlnet"] = tiny["edit"]["model"], tiny["edit"]["controlnet"]
    assert sdxl == tiny


def test_sdxl_paper_profile_is_sd15_paper_on_sdxl():
    import yaml

    from richpref.schemas.config import find_profile, load_profile

    profile = load_profile("sdxl-paper")
    assert profile.sample.model == profile.edit.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (profile.sample.height, profile.sample.width) == (1024, 1024)
    assert profile.edit.controlnet == "diffusers/controlnet-canny-sdxl-1.0"
    sd15 = yaml.safe_load(find_profile("sd15-paper").read_text())
    sdxl = yaml.safe_load(find_profile("sdxl-paper").read_text())
    for section in ("name", "description", "sample", "edit"):
        sd15.pop(section), sdxl.pop(section)
    assert sdxl == sd15  # every other stage is the paper's: change both files alike


def test_tiny_sdxl_profile_curates_end_to_end(tiny_models, prefect_harness, tmp_path):
    from richpref.ops.entrypoints import CURATE, load_flow
    from richpref.run.storage import RunStore

    curate = load_flow(CURATE)

    summary = curate(profile="tiny-sdxl", run="sdxl", data_dir=str(tmp_path),
                     overrides=["source.limit=8", "source.shard_size=8", *ONE_REWARD], models_root=str(tiny_models))
    store = RunStore(str(tmp_path), "sdxl")

    def stage_table(stage: str) -> pa.Table:
        return pa.concat_tables([store.read_shard(stage, k) for k in store.shards(stage)])

    samples = stage_table("sample").to_pylist()
    assert len(samples) == 8 and all(r["model_id"].endswith("/sdxl") for r in samples)
    edits = [r for r in stage_table("edit").to_pylist() if r["status"] == "ok"]
    assert edits and all(r["model_id"].endswith("/controlnet-sdxl") for r in edits)
    assert summary["stages"]["edit"]["kept"] == len(edits)
    cutouts = stage_table("cutout").to_pylist()
    assert all(_png(r["original_mask"]).mode == "L" for r in cutouts if r["status"] == "ok")
    relabelled = [r for r in stage_table("relabel").to_pylist() if r["status"] == "ok"]
    pairs = stage_table("pairs")
    assert pairs.num_rows == len(relabelled)
    assert set(pairs.column("label_0").to_pylist()) <= {0, 1}
