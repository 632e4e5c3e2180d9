"""The evaluate flow on tiny models: base vs a DPO-tuned tiny SD with the same prompts and seeds,
scored by the reward registry, tabulated as RPO's Table 1, with an image grid."""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from richpref.training.evaluation import summary_table, to_markdown
from image_helpers import encoded


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_summary_table_means_and_win_rates_by_hand():
    scores = {"pickscore": {"base": [1.0, 2.0, 3.0, 4.0], "tuned": [2.0, 2.0, 1.0, 5.0]},
              "aesthetic": {"base": [5.0, 5.0, 5.0, 5.0], "tuned": [4.0, 6.0, 6.0, 6.0]}}
    rows = summary_table(scores, ["base", "tuned"])
    assert rows[0] == {"model": "base", "images": 4, "pickscore": 2.5, "aesthetic": 5.0,
                       "pickscore_win_vs_base": None, "aesthetic_win_vs_base": None}
    # tuned vs base per image: pickscore win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4; aesthetic 3 of 4
    assert rows[1] == {"model": "tuned", "images": 4, "pickscore": 2.5, "aesthetic": 5.5,
                       "pickscore_win_vs_base": 0.625, "aesthetic_win_vs_base": 0.75}
    md = to_markdown(rows)
    assert md.splitlines()[0] == "| model | images | pickscore | aesthetic | pickscore win vs base | aesthetic win vs base |"
    assert "| tuned | 4 | 2.5000 | 5.5000 | 0.6250 | 0.7500 |" in md


def test_every_image_has_its_own_seed_the_same_for_every_model():
    from richpref.schemas.training import load_evaluate_config
    from richpref.training.evaluation import image_plan

    cfg = load_evaluate_config("evaluate-tiny", ["images_per_prompt=3", "seed=10"])
    assert image_plan(["a cat", "a dog"], cfg) == (["a cat"] * 3 + ["a dog"] * 3, [10, 11, 12, 13, 14, 15],
                                                   [0, 0, 0, 1, 1, 1])


def test_the_images_key_follows_the_text_length_they_are_sampled_with(tiny_models):
    from richpref.schemas.training import load_evaluate_config
    from richpref.training.evaluation import _generation_key

    def key(*overrides: str) -> str:
        cfg = load_evaluate_config("evaluate-tiny-flux", [f"models_root={tiny_models}", *overrides])
        return _generation_key(cfg.models[0], ["a cat"], [0], cfg)

    assert len({key(), key("max_sequence_length=128"), key("max_sequence_length=null")}) == 3


@pytest.fixture(scope="module")
def tuned_model(tiny_models, tmp_path_factory):
    """A full DPO fine-tune of the tiny SD 1.5: 2 steps with a large lr, so its images differ."""
    from richpref.schemas.training import FinetuneConfig
    from richpref.training.train import train
    import pyarrow as pa

    rng = np.random.default_rng(0)

    def png() -> bytes:
        return encoded(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))

    tmp = tmp_path_factory.mktemp("tuned")
    data = tmp / "pairs.parquet"
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a car", "a cup"], "jpg_0": [png() for _ in range(4)],
                             "jpg_1": [png() for _ in range(4)], "label_0": [1, 0, 1, 0]}), data)
    cfg = FinetuneConfig(models_root=str(tiny_models), model="sd15", mode="full", data=[{"path": str(data)}],
                         resolution=64, learning_rate=1e-3, scale_lr=False, lr_scheduler="constant",
                         lr_warmup_steps=0, train_batch_size=2, max_train_steps=2, checkpointing_steps=100)
    train(cfg, tmp / "run")
    return tmp / "run"


def test_evaluate_base_vs_tuned(prefect_harness, tiny_models, tuned_model, tmp_path, caplog):
    from prefect.client.orchestration import get_client

    from flows.evaluate import evaluate
    from richpref.training.evaluation import artifact_key
    from richpref.models.generator import TextToImage
    from richpref.models.rewards import load_reward_spec
    from richpref.schemas.training import load_evaluate_config

    overrides = [f"models_root={tiny_models}", "prompts.limit=3",
                 f"models=[{{name: base, path: sd15}}, {{name: tuned, path: {tuned_model}}}]"]
    out = tmp_path / "eval"
    with caplog.at_level("INFO", logger="richpref"):
        result = evaluate(config="evaluate-tiny", overrides=overrides, output_dir=str(out))
    # The command prints the table; the log names its files instead of printing it a second time.
    assert str(out) in caplog.text and "| model |" not in caplog.text and "| model |" in result["markdown"]
    cfg = load_evaluate_config("evaluate-tiny", overrides)
    assert result["prompts"] == 3 and result["images_per_model"] == 3

    base_imgs = pq.read_table(out / "images" / "base.parquet")
    tuned_imgs = pq.read_table(out / "images" / "tuned.parquet")
    prompts = base_imgs.column("prompt").to_pylist()
    seeds = base_imgs.column("seed").to_pylist()
    assert tuned_imgs.column("seed").to_pylist() == seeds == [0, 1, 2]
    assert tuned_imgs.column("prompt").to_pylist() == prompts
    decode = lambda b: Image.open(io.BytesIO(b)).convert("RGB")  # noqa: E731
    base_pics = [decode(b) for b in base_imgs.column("image").to_pylist()]
    tuned_pics = [decode(b) for b in tuned_imgs.column("image").to_pylist()]

    # Identical seeds: the base images are what the generator makes for (prompt, seed) on its own.
    t2i = TextToImage.load(str(tiny_models / "sd15"))
    direct = t2i.generate(prompts, seeds, steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=64, width=64)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(direct, base_pics))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base_pics, tuned_pics))

    # The table's means are the rewards' own scores of the stored images, averaged.
    table = {r["model"]: r for r in pq.read_table(out / "table.parquet").to_pylist()}
    assert set(table) == {"base", "tuned"}
    for name in ("pickscore", "imagereward", "aesthetic", "hpsv2"):
        reward = load_reward_spec(cfg.rewards[name], cfg.models_root, device="cpu")
        base_scores = np.asarray(reward.score(base_pics, prompts))
        tuned_scores = np.asarray(reward.score(tuned_pics, prompts))
        assert table["base"][name] == pytest.approx(base_scores.mean(), rel=1e-5, abs=1e-6), name
        assert table["tuned"][name] == pytest.approx(tuned_scores.mean(), rel=1e-5, abs=1e-6), name
        wins = np.mean((tuned_scores > base_scores) + 0.5 * (tuned_scores == base_scores))
        assert table["tuned"][f"{name}_win_vs_base"] == pytest.approx(wins)
    assert "| hpsv2 (HPSv2 v2.0) |" in (out / "table.md").read_text()  # v2.0 and v2.1 are not comparable
    per_image = pq.read_table(out / "scores.parquet")
    assert per_image.num_rows == 6 and per_image.column("model").to_pylist() == ["base"] * 3 + ["tuned"] * 3

    md = (out / "table.md").read_text()
    assert md.startswith("| model | images | pickscore |") and "| tuned | 3 |" in md
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 64, 16 + 3 * 64)
    assert np.array_equal(np.asarray(grid.convert("RGB"))[16:80, 64:128], np.asarray(tuned_pics[0]))

    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_latest_artifacts()}
    table_artifact = artifacts[artifact_key("evaluate-tiny")]
    assert table_artifact.type == "table" and "tuned" in str(table_artifact.data)

    # Running it again reuses the stored images (same prompts, seeds and settings).
    stamp = (out / "images" / "base.parquet").stat().st_mtime_ns
    evaluate(config="evaluate-tiny", overrides=overrides, output_dir=str(out))
    assert (out / "images" / "base.parquet").stat().st_mtime_ns == stamp


def test_a_tuned_model_trained_again_in_its_folder_makes_new_images(tuned_model, tiny_models, tmp_path):
    # before: its images were keyed by the folder's path alone, so evaluate reused the old weights' images
    import shutil

    from richpref.schemas.training import load_evaluate_config
    from richpref.training.evaluation import _generation_key

    shutil.copytree(tuned_model, tmp_path / "run")
    cfg = load_evaluate_config("evaluate-tiny", [f"models_root={tiny_models}",
                                                 f"models=[{{name: tuned, path: {tmp_path / 'run'}}}]"])
    key = _generation_key(cfg.models[0], ["a cat"], [0], cfg)
    assert _generation_key(cfg.models[0], ["a cat"], [0], cfg) == key  # the same weights: the same images
    weights = next((tmp_path / "run" / "final" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")  # trained again: other bytes at the same path
    assert _generation_key(cfg.models[0], ["a cat"], [0], cfg) != key


def test_a_full_flow_dpo_fine_tune_is_evaluated_by_its_transformer(tiny_models, tmp_path):
    # before: its images' key looked for the tuned weights in final/ or final/unet/ and the evaluation
    # failed ("no diffusers UNet folder") on the final/transformer/ a full Flow-DPO run writes
    import json

    import torch
    from diffusers import FluxTransformer2DModel

    from richpref.schemas.training import load_evaluate_config
    from richpref.models.tuned import TunedWeightsError, weights_fingerprint
    from richpref.training.evaluation import _generation_key, generate_task

    final = tmp_path / "run" / "final"
    tuned = FluxTransformer2DModel.from_pretrained(tiny_models / "flux", subfolder="transformer")
    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(1.5)  # other weights than the base's: other images
    tuned.save_pretrained(final / "transformer")
    (final / "finetune.json").write_text(json.dumps({"mode": "full", "arch": "flux", "steps": 1,
                                                     "base_model_path": str(tiny_models / "flux")}))
    cfg = load_evaluate_config("evaluate-tiny-flux", [f"models_root={tiny_models}", "steps=1", "height=32", "width=32",
                                                      f"models=[{{name: base, path: flux}}, {{name: full, path: {tmp_path / 'run'}}}]"])
    key = _generation_key(cfg.models[1], ["a cat"], [0], cfg)
    images = {m.name: pq.read_table(generate_task.fn(m, ["a cat"], [0], cfg, str(tmp_path / "eval"))).column("image")[0]
              for m in cfg.models}
    assert images["full"] != images["base"]
    weights = next((final / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")  # trained again: other bytes at the same path
    assert _generation_key(cfg.models[1], ["a cat"], [0], cfg) != key
    # given to curate as sample.unet: named for what it is (before: "no diffusers UNet folder ... give a full
    # finetune output folder", which it is)
    with pytest.raises(TunedWeightsError, match=r"a full fine-tune of a flow-matching transformer .* as a LoRA \(sample.lora"):
        weights_fingerprint(unet=str(tmp_path / "run"))


def test_full_unet_weights_are_refused_by_a_flow_matching_model(tuned_model, tiny_flux):
    from richpref.models.tuned import TunedWeightsError, apply_tuned

    with pytest.raises(TunedWeightsError, match=r"is a flux_dev flow-matching transformer, not a UNet; give its tuned LoRA"):
        apply_tuned(tiny_flux, unet=str(tuned_model))


def test_preflight_refuses_pair_rewards_and_missing_models(tiny_models, tmp_path):
    from richpref.training.evaluation import preflight
    from richpref.models.runtime import ModelNotAvailable
    from richpref.schemas.training import load_evaluate_config

    cfg = load_evaluate_config("evaluate-tiny", ["rewards={dino: {kind: dino_patch, model: dinov2}}"])
    with pytest.raises(ValueError, match="score pairs, not single images"):
        preflight(cfg)
    missing = load_evaluate_config("evaluate-tiny", [f"models_root={tiny_models}",
                                                     f"models=[{{name: tuned, path: {tmp_path / 'nothing'}}}]"])
    with pytest.raises(ModelNotAvailable, match="evaluate model 'tuned'.*run `richpref finetune` first"):
        preflight(missing)
    # more prompt tokens than the family's sampler takes: before, refused after the first model loaded
    long = load_evaluate_config("evaluate-tiny-flux", [f"models_root={tiny_models}", "max_sequence_length=513",
                                                       "models=[{name: base, path: flux}]"])
    with pytest.raises(ValueError, match=r"^evaluate model 'base': max_sequence_length 513: flux_dev models take at most 512"):
        preflight(long)
    assert preflight(long.model_copy(update={"max_sequence_length": 512}))


def test_preflight_refuses_prompts_that_are_missing_or_empty(tmp_path):
    # before, the flow started and failed with a traceback on the missing file
    from richpref.training.evaluation import preflight
    from richpref.schemas.training import load_evaluate_config

    with pytest.raises(ValueError, match=r"evaluate.prompts: source.path '.*none.txt' matches no prompts file"):
        preflight(load_evaluate_config("evaluate-tiny", [f"prompts.path={tmp_path / 'none.txt'}"]))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match=r"evaluate.prompts \(prompts .*blank.txt\) gave no usable prompt"):
        preflight(load_evaluate_config("evaluate-tiny", [f"prompts.path={tmp_path / 'blank.txt'}"]))


def test_tuned_model_paths_resolve_against_the_data_dir(tiny_models, tmp_path, monkeypatch):
    """The shipped evaluate configs name the tuned model relative to the data dir (where `richpref
    finetune` writes it), so `--data-dir X` finds X/finetune/<config>, whatever the working directory."""
    import json

    from richpref.training.evaluation import preflight, with_data_dir
    from richpref.schemas.training import load_evaluate_config

    monkeypatch.chdir(tmp_path)  # no data/ here
    data = tmp_path / "scratch-data"
    for name in ("evaluate-tiny", "evaluate-tiny-flux", "evaluate-tiny-sd3", "evaluate-tiny-qwen-image"):
        cfg = load_evaluate_config(name, [f"models_root={tiny_models}"])
        tuned = cfg.models[-1]
        (data / tuned.path / "final").mkdir(parents=True, exist_ok=True)
        (data / tuned.path / "final" / "finetune.json").write_text(json.dumps({"arch": "x"}))
        resolved = with_data_dir(cfg, str(data))
        assert resolved.models[-1].path == str((data / tuned.path).resolve())
        assert resolved.models[0].path == cfg.models[0].path  # a base model still resolves against models_root
        preflight(resolved)
    # a LoRA folder named relative to the data dir, too; absolute paths are left alone
    (data / "loras" / "x").mkdir(parents=True)
    cfg = load_evaluate_config("evaluate-tiny-flux", [f"models_root={tiny_models}",
                                                      "models=[{name: a, path: flux, lora: loras/x}, "
                                                      f"{{name: b, path: {tiny_models / 'flux'}}}]"])
    resolved = with_data_dir(cfg, str(data))
    assert resolved.models[0].lora == str((data / "loras" / "x").resolve())
    assert resolved.models[1].path == str(tiny_models / "flux")


def test_the_evaluate_flow_resolves_against_its_data_dir(tiny_models, tmp_path):
    """The flow itself applies the data dir (a missing tuned model is named from there, before anything loads)."""
    from flows.evaluate import evaluate
    from richpref.models.runtime import ModelNotAvailable

    with pytest.raises(ModelNotAvailable, match=r"evaluate model 'tuned'.*finetune/finetune-tiny-flux"):
        evaluate.fn(config="evaluate-tiny-flux", overrides=[f"models_root={tiny_models}"], data_dir=str(tmp_path))
