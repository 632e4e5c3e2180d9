"""Diffusion-DPO training on the tiny models: the pairs a source gives, full / LoRA / SDXL LoRA runs whose
weights load back into diffusers pipelines, a 2-process accelerate run killed and resumed, the
finetune flow, and launching it once per set of curated pairs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from richpref.schemas.training import FinetuneConfig, PairSourceConfig
from richpref.training.data import DataError, load_pair_source
from image_helpers import encoded


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(array: np.ndarray) -> bytes:
    return encoded(Image.fromarray(array.astype(np.uint8)))


def write_pairs(path: Path, n: int, seed: int = 0, ties: int = 0) -> Path:
    """A Pick-a-Pic-format Parquet file of `n` random 64 px pairs (+ `ties` rows labelled 0.5)."""
    rng = np.random.default_rng(seed)
    rows = n + ties
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "caption": [f"a photo of object {i}" for i in range(rows)],
        "jpg_0": [_png(rng.integers(0, 256, (64, 64, 3))) for _ in range(rows)],
        "jpg_1": [_png(rng.integers(0, 256, (64, 64, 3))) for _ in range(rows)],
        "label_0": [float(i % 2) for i in range(n)] + [0.5] * ties,
    }), path)
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 12, ties=2)


def tiny_config(tiny_models: Path, data: Path, **kw) -> FinetuneConfig:
    base = dict(models_root=str(tiny_models), model="sd15", mode="lora", data=[{"name": "pairs", "path": str(data)}],
                resolution=64, learning_rate=1e-3, scale_lr=False, lr_scheduler="constant", lr_warmup_steps=0,
                train_batch_size=2, max_train_steps=3, checkpointing_steps=100, seed=0)
    return FinetuneConfig(**{**base, **kw})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def generate(pipe, seed: int = 3) -> np.ndarray:
    image = pipe(["a red cube"], generator=torch.Generator().manual_seed(seed), output_type="np",
                 num_inference_steps=2, guidance_scale=5.0, height=64, width=64).images[0]
    return np.asarray(image)


# --- the pairs a source gives, the flow's steps ----------------------------------------------------

def test_ties_dropped_and_missing_columns_named(pairs_file, tmp_path):
    # a run's pairs/ folder where the first shard kept no pair: the empty file is left out, the others read
    folder = tmp_path / "pairs"
    folder.mkdir()
    table = pq.read_table(pairs_file)
    pq.write_table(table.slice(0, 0), folder / "part-00000.parquet")
    pq.write_table(table, folder / "part-00001.parquet")
    pq.write_table(table, folder / "part-00002.parquet")
    ds = load_pair_source(PairSourceConfig(path=str(folder)))
    assert len(ds) == 24 and set(ds["label_0"]) == {0.0, 1.0}
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"x"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['jpg_1', 'label_0'\]"):
        load_pair_source(PairSourceConfig(path=str(tmp_path / "bad.parquet")))
    with pytest.raises(DataError, match="no .parquet files"):
        load_pair_source(PairSourceConfig(path=str(tmp_path / "nothing-here")))
    (tmp_path / "run.json").write_text("{}")  # the run's folder itself: before, every stage's table was read
    with pytest.raises(DataError, match=rf"{tmp_path}' is a run's folder: give its pairs, '{folder}'"):
        load_pair_source(PairSourceConfig(path=str(tmp_path)))


def test_pairs_without_a_caption_are_dropped_not_trained_as_unconditional(pairs_file, tmp_path, tiny_models,
                                                                         monkeypatch):
    import richpref.training.train as trainer
    table = pq.read_table(pairs_file).slice(0, 4)
    captions = table.column("caption").to_pylist()
    blank = table.set_column(table.schema.get_field_index("caption"), "caption",
                             pa.array([None, " \t", *captions[2:]], pa.string()))
    pq.write_table(blank, tmp_path / "pairs.parquet")
    ds = load_pair_source(PairSourceConfig(path=str(tmp_path / "pairs.parquet")))
    assert ds["caption"] == captions[2:]  # before: all 4, the first two trained with the empty prompt
    pq.write_table(blank.slice(0, 2), tmp_path / "none.parquet")
    with pytest.raises(DataError, match=r"no usable pairs \(no rows with label_0 in \{0, 1\} and a caption\)"):
        load_pair_source(PairSourceConfig(path=str(tmp_path / "none.parquet")))
    # the trainer reads its pairs before it loads a model (before: minutes of a 12B load, then this error)
    monkeypatch.setattr(trainer, "setup_model", lambda *a, **k: pytest.fail("a model loaded before the pairs were read"))
    with pytest.raises(DataError, match="has no usable pairs"):
        trainer.train(tiny_config(tiny_models, tmp_path / "none.parquet", mode="lora", max_train_steps=1), tmp_path / "o")


def test_pairs_replace_the_pairs_source_keeping_its_weight_and_the_other_sources():
    from richpref.training.finetune import with_pairs

    mixed = FinetuneConfig(name="m", model="sd15", data=[
        PairSourceConfig(name="pickapic", path="pp", weight=2.0), PairSourceConfig(name="pairs", path="old", weight=0.5)])
    got = with_pairs(mixed, "runs/new/pairs")
    assert [(s.name, s.path, s.weight) for s in got.data] == [("pickapic", "pp", 2.0), ("pairs", "runs/new/pairs", 0.5)]
    only_other = FinetuneConfig(name="o", model="sd15", data=[PairSourceConfig(name="pickapic", path="pp", weight=2.0)])
    assert [(s.name, s.weight) for s in with_pairs(only_other, "p").data] == [("pickapic", 2.0), ("pairs", 1.0)]
    assert with_pairs(mixed, None) is mixed


def test_progress_reads_the_last_metrics_line_and_the_summary_names_the_last_step(tmp_path):
    from richpref.training.finetune import last_metrics, summary_markdown

    assert last_metrics(str(tmp_path)) == {}  # nothing trained yet
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    assert last_metrics(str(tmp_path)) == {"step": 3}
    cfg = FinetuneConfig(name="m", model="sd15", data=[PairSourceConfig(name="pairs", path="p", weight=0.5)])
    meta = {"arch": "sd15", "mode": "lora", "steps": 3, "base_model": "sd15",
            "last_metrics": {"loss": 0.6931, "implicit_acc": 0.5, "reward_margin": 0.00125, "heldout_pairs": 4,
                             "heldout_draws": 2, "heldout_implicit_acc": 0.75, "heldout_reward_margin": -0.5}}
    text = summary_markdown(cfg, meta, str(tmp_path / "final"))
    assert "- last step: loss 0.6931, implicit accuracy 0.500, reward margin 0.00125" in text
    assert "- held-out (4 pairs × 2 draws): implicit accuracy 0.750, reward margin -0.5" in text
    assert "- data: pairs (weight 0.5)" in text and "curves" not in text
    (tmp_path / "heldout.png").write_bytes(b"")
    assert "last step" not in summary_markdown(cfg, {**meta, "last_metrics": None}, str(tmp_path / "final"))
    assert f"- curves: `{tmp_path / 'heldout.png'}`" in summary_markdown(cfg, meta, str(tmp_path / "final"))


def test_effective_batch_sets_accumulation():
    cfg = FinetuneConfig(data=[], train_batch_size=2, effective_batch_size=16, learning_rate=1e-8)
    assert cfg.accumulation_steps(4) == 2
    assert cfg.learning_rate_for(4) == pytest.approx(1e-8 * 2 * 2 * 4)
    with pytest.raises(ValueError, match="not a multiple"):
        cfg.accumulation_steps(3)


# --- training in this process ----------------------------------------------------------------------

def test_full_finetune_loads_with_from_pretrained_and_changes_output(tiny_models, pairs_file, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from richpref.training.train import train

    out = tmp_path / "full"
    cfg = tiny_config(tiny_models, pairs_file, mode="full", max_train_steps=2, train_batch_size=2,
                      gradient_accumulation_steps=2)
    meta = train(cfg, out)
    assert meta["steps"] == 2 and meta["mode"] == "full"
    log = metrics(out)
    assert [r["step"] for r in log] == [1, 2]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # model = reference before the first update
    assert log[-1]["samples_seen"] == 2 * 2 * 2
    assert log[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)

    tuned_unet = UNet2DConditionModel.from_pretrained(out / "final" / "unet")
    base = StableDiffusionPipeline.from_pretrained(tiny_models / "sd15")
    base.set_progress_bar_config(disable=True)
    before = generate(base)
    base_weights = {k: v.clone() for k, v in base.unet.state_dict().items()}
    base.unet = tuned_unet
    after = generate(base)
    assert any(not torch.equal(base_weights[k], v) for k, v in tuned_unet.state_dict().items())
    assert np.abs(after - before).mean() > 1e-3

    # Same config again: nothing to do, nothing logged.
    assert train(cfg, out)["steps"] == 2
    assert len(metrics(out)) == 2


def test_sdxl_lora_loads_into_sdxl_pipeline(tiny_models, pairs_file, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from richpref.training.train import train

    out = tmp_path / "sdxl"
    meta = train(tiny_config(tiny_models, pairs_file, model="sdxl", mode="lora", max_train_steps=2), out)
    assert meta["arch"] == "sdxl" and (out / "final" / "pytorch_lora_weights.safetensors").exists()
    assert metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    pipe.load_lora_weights(str(out / "final"))
    assert np.abs(generate(pipe) - before).mean() > 1e-4


def test_resume_refuses_a_checkpoint_of_another_config(tiny_models, pairs_file, tmp_path, capsys):
    from richpref.cli.commands import main
    from richpref.training.checkpoints import OtherConfig
    from richpref.training.launcher import launch_training
    from richpref.training.train import train

    ckpt = tmp_path / "run" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "samples_seen": 4, "config_hash": "other"}))
    with pytest.raises(OtherConfig, match="another config"):
        train(tiny_config(tiny_models, pairs_file), tmp_path / "run")
    # before, the launcher started the trainers, which failed on it, were relaunched and failed again;
    # the command ended naming train.log, not the folder and the fix
    with pytest.raises(OtherConfig, match="another config"):
        launch_training(tiny_config(tiny_models, pairs_file), tmp_path / "run", max_restarts=2)
    assert not (tmp_path / "run" / "finetune-config.yaml").exists()
    args = ["--data-dir", str(tmp_path / "data"), "finetune", "--config", "finetune-tiny", "--models-root", str(tiny_models),
            "--pairs", str(pairs_file), "--output-dir", str(tmp_path / "run")]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith(f"error: {ckpt} was made with another config (hash other, now ")


# --- the finetune flow: two processes under accelerate launch, killed and relaunched ---------------

@pytest.fixture(scope="module")
def resumed_lora_run(prefect_harness, tiny_models, pairs_file, tmp_path_factory):
    """The finetune flow on 2 processes (gloo), checkpoints every 2 steps, keep 1. Rank 0 SIGKILLs
    itself after step 3; the flow's launcher relaunches and training resumes from checkpoint-2."""
    import os

    import yaml

    from flows.finetune import finetune

    tmp = tmp_path_factory.mktemp("lora2")
    config = tmp / "ft.yaml"
    cfg = tiny_config(tiny_models, Path("replaced-by-the-pairs-parameter"), mode="lora", max_train_steps=6,
                      checkpointing_steps=2, checkpoints_total_limit=1, train_batch_size=1)
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp / "run"
    os.environ["RICHPREF_TRAIN_FAULTS"] = "kill-after-step:3"
    try:
        result = finetune(config=str(config), pairs=str(pairs_file.parent), output_dir=str(out), num_processes=2,
                          max_restarts=1)
    finally:
        del os.environ["RICHPREF_TRAIN_FAULTS"]
    return out, result, config


def test_two_process_run_resumes_from_its_checkpoint(resumed_lora_run):
    out, result, _ = resumed_lora_run
    log = metrics(out)
    killed = [r for r in log if r["launch"] == log[0]["launch"]]
    resumed = [r for r in log if r["launch"] != log[0]["launch"]]
    assert [r["step"] for r in killed] == [1, 2, 3]
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert all(r["resumed_from"] == 2 for r in resumed)
    assert (out / "train.log").read_text().count("SIGKILL") >= 1  # the first launch really died
    # Step 3 again, from the restored weights, optimizer and data position: the same numbers.
    for key in ("loss", "implicit_acc", "reward_margin", "grad_norm", "param_norm", "samples_seen"):
        assert resumed[0][key] == pytest.approx(killed[2][key], rel=1e-6, abs=1e-9), key
    assert resumed[0]["samples_seen"] == 3 * 2  # 2 processes × 1 pair × 3 steps
    assert result["steps"] == 6 and result["mode"] == "lora"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]  # keep the last 1: the last step's
    assert not list(out.glob("*.tmp*"))


def test_finetune_flow_uses_the_pairs_and_is_a_noop_when_done(resumed_lora_run, pairs_file):
    import yaml

    from flows.finetune import finetune

    out, result, config = resumed_lora_run
    saved = yaml.safe_load((out / "finetune-config.yaml").read_text())
    assert [(d["name"], d["path"]) for d in saved["data"]] == [("pairs", str(pairs_file.parent))]
    again = finetune(config=str(config), pairs=str(pairs_file.parent), output_dir=str(out), num_processes=2)
    assert again["steps"] == 6 and len(metrics(out)) == 7  # nothing launched, nothing logged


def test_the_flow_refuses_a_config_the_trainer_would_fail_on_before_launching(prefect_harness, tiny_models,
                                                                              pairs_file, tmp_path):
    # a deployment runs the flow without the command's checks: before, it launched the trainer twice (each
    # failing on the config), then said "launch again to resume from the latest checkpoint"
    import yaml

    from flows.finetune import finetune
    from richpref.training.flow_models import ArchMismatch

    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny_models, pairs_file).model_dump(mode="json")))
    with pytest.raises(ArchMismatch, match="is a sd15 checkpoint but the config says arch: flux"):
        finetune(config=str(config), output_dir=str(tmp_path / "out"), overrides=["arch=flux"])
    assert not (tmp_path / "out" / "train.log").exists()


def test_a_run_trained_longer_resumes_from_its_last_step(resumed_lora_run, pairs_file, tmp_path):
    # before: the last step saved no checkpoint, so 6 -> 8 steps resumed from step 4 and did 5 and 6 again
    import shutil

    from flows.finetune import finetune

    out, _, config = resumed_lora_run
    shutil.copytree(out, longer := tmp_path / "run")
    result = finetune(config=str(config), pairs=str(pairs_file.parent), output_dir=str(longer), num_processes=2,
                      overrides=["max_train_steps=8"])
    added = metrics(longer)[len(metrics(out)):]
    assert [r["step"] for r in added] == [7, 8] and all(r["resumed_from"] == 6 for r in added) and result["steps"] == 8


def test_lora_output_loads_into_pipeline_and_changes_output(resumed_lora_run, tiny_models, capfd):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from richpref.training.models import load_finetuned

    out = resumed_lora_run[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models / "sd15")
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    pipe.load_lora_weights(str(out / "final"))
    saved = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.get_active_adapters()[0])
    assert len(saved) == len(loaded) > 0
    assert sorted(v.norm().item() for v in saved.values()) == pytest.approx(
        sorted(v.norm().item() for v in loaded.values()), rel=1e-6)
    after = generate(pipe)
    assert np.abs(after - before).mean() > 1e-4
    capfd.readouterr()
    tuned = load_finetuned(out)  # what the evaluate flow loads: base + the same LoRA
    assert np.array_equal(generate(tuned.pipe), after)
    # diffusers' note that a UNet LoRA has no text-encoder keys, once per load and per encoder: not shown
    assert "No LoRA keys associated to" not in capfd.readouterr().err
