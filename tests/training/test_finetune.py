"""Diffusion-DPO training on the tiny models: data and mixing, full / LoRA / SDXL LoRA runs whose
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
from richpref.training.data import Augment, DataError, PairBatches, PairMixture, load_pair_source
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


# --- data -------------------------------------------------------------------------------------------

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


def test_heldout_split_always_leaves_a_pair_to_train():
    import datasets

    from richpref.training.data import split_heldout

    two = datasets.Dataset.from_dict({"caption": ["a", "b"]})
    train, held = split_heldout(two, 0.25, 0, "pairs")  # both rows draw below 0.25 (a tiny curate run's pairs)
    assert (len(train), len(held)) == (1, 1)
    train, held = split_heldout(two.select([0]), 0.25, 0, "pairs")
    assert len(train) == 1 and held is None


def test_mixture_weights_epochs_and_resume_offsets():
    mix = PairMixture([10, 30], [3.0, 1.0], seed=7)
    where = mix.locate(range(4000))
    share = sum(s == 0 for s, _ in where) / len(where)
    assert share == pytest.approx(0.75, abs=0.03)
    # Within a source, the first pass over its rows is a permutation: no repeats before all are seen.
    first_pass = [r for s, r in where if s == 0][:10]
    assert sorted(first_pass) == list(range(10))
    # Resuming at sample 2500 with a fresh mixture gives the same draws as the uninterrupted stream.
    assert PairMixture([10, 30], [3.0, 1.0], seed=7).locate(range(2500, 2600)) == where[2500:2600]
    assert PairMixture([10, 30], [3.0, 1.0], seed=8).locate(range(100)) != where[:100]


def test_mixture_draws_across_blocks_as_one_stream():
    """Past a block of source choices (65,536 samples: any long run) each source's draws go on where the
    earlier blocks left them: every pass over a source is a permutation of its rows, and a fresh
    mixture resumed in a later block draws the same. Blocks of 8 here, so 200 samples cross 25 of them."""
    class SmallBlocks(PairMixture):
        BLOCK = 8

    where = SmallBlocks([3, 5], [1.0, 1.0], seed=3).locate(range(200))
    for source, n in ((0, 3), (1, 5)):
        rows = [r for s, r in where if s == source]
        passes = [rows[k:k + n] for k in range(0, len(rows) - n + 1, n)]
        assert len(passes) >= 10 and all(sorted(p) == list(range(n)) for p in passes), (source, rows)
    assert SmallBlocks([3, 5], [1.0, 1.0], seed=3).locate(range(150, 200)) == where[150:]


def test_heldout_rows_are_those_whose_hash_falls_below_the_fraction():
    import datasets

    from richpref.training.data import seed_for, split_heldout

    rows = datasets.Dataset.from_dict({"caption": [f"c{r}" for r in range(400)]})
    train, held = split_heldout(rows, 0.1, 5, "pairs")
    expected = [r for r in range(400) if seed_for(5, "heldout", "pairs", r) % 100_000 < 10_000]
    assert held["caption"] == [f"c{r}" for r in expected] and 20 < len(expected) < 60
    assert train["caption"] == [f"c{r}" for r in range(400) if r not in set(expected)]


def test_positions_split_across_processes_like_one_process():
    mix, aug = PairMixture([5], [1.0], 0), Augment(64)
    one = PairBatches([None], mix, aug, batch_size=4, rank=0, world=1, start=8)
    two = [PairBatches([None], mix, aug, batch_size=2, rank=r, world=2, start=8) for r in (0, 1)]
    for micro in range(3):
        assert sorted(two[0].positions(micro) + two[1].positions(micro)) == one.positions(micro)


def test_batches_put_the_preferred_image_first_and_flip_pairs_together():
    import datasets

    red, blue = np.zeros((64, 64, 3)), np.zeros((64, 64, 3))
    red[..., 0], blue[..., 2] = 255, 255
    red[:, :32] = 0  # left half black: a flip is visible
    blue[:, :32] = 0
    ds = datasets.Dataset.from_dict({"caption": ["a", "b"], "jpg_0": [_png(red)] * 2, "jpg_1": [_png(blue)] * 2,
                                     "label_0": [1, 0]})
    batches = PairBatches([ds], PairMixture([2], [1.0], 0), Augment(64, hflip=True, seed=1), batch_size=2)
    flipped = []  # per sample: the bright half moved to the left (the originals' left half is black)
    for micro in range(8):
        b = batches[micro]
        flipped += [bool((b["pixels"][k].max(0).values[:, 0] > 0).all()) for k in range(2)]
        captions = list(b["captions"])
        px = b["pixels"]  # [chosen..., rejected...], values in [-1, 1]
        for k, cap in enumerate(captions):
            chosen, rejected = px[k], px[2 + k]
            chosen_is_red = chosen[0].max() > 0.9
            assert chosen_is_red == (cap == "a")  # label_0 = 1 -> jpg_0 (red) preferred
            assert rejected[0].max() > 0.9 or rejected[2].max() > 0.9
            # Both images of a pair flip together: their bright halves are on the same side.
            assert (chosen.max(0).values[:, 0] > 0).all() == (rejected.max(0).values[:, 0] > 0).all()
    assert 0 < sum(flipped) < len(flipped)  # half the samples, drawn per sample number
    unflipped = PairBatches([ds], PairMixture([2], [1.0], 0), Augment(64, hflip=False, seed=1), batch_size=2)
    assert not any((unflipped[m]["pixels"][:, :, :, 0] > -1).any() for m in range(8))
    empty = PairBatches([ds], PairMixture([2], [1.0], 0), Augment(64, proportion_empty_prompts=1.0), batch_size=2)
    assert list(empty[0]["captions"]) == ["", ""]


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
