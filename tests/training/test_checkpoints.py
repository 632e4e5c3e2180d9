"""A finetune output folder (richpref/training/checkpoints.py).

Whether it holds a config's run: the pairs it trained on, by content (data key), decide as much as the
config does; pairs curated again at the same path are not the pairs a finished model or a checkpoint
learned from.

FSDP's save path on CPU: accelerate (1.16) shards on GPUs only (docs/operations.md, FSDP), but torch's own
fully_shard runs on CPU over gloo, so the gather-and-save of the tuned weights is tested here on a
sharded tiny FLUX.1 transformer in 2 processes."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from fsdp_worker import main as worker
from process_helpers import run_spawned

from richpref.schemas.training import FinetuneConfig
from richpref.training.checkpoints import OtherConfig, check_resumable, data_key, finished



def test_sharded_full_finetune_saves_the_whole_transformer(paths, tmp_path):
    assert run_spawned(worker, [(rank, 2, str(paths.flux), str(tmp_path)) for rank in range(2)]) == [0, 0]

    base = FluxTransformer2DModel.from_pretrained(paths.flux, subfolder="transformer")
    tuned = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")  # every weight, whole, not rank 0's shard
    base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
    assert tuned_sd.keys() == base_sd.keys()
    assert all(tuned_sd[k].shape == v.shape for k, v in base_sd.items())
    changed = [k for k, v in base_sd.items() if not torch.equal(tuned_sd[k], v)]
    assert len(changed) > len(base_sd) // 2
    pipe = FluxPipeline.from_pretrained(paths.flux, transformer=tuned)
    image = pipe("a red cube", height=32, width=32, num_inference_steps=1, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and float(abs(image).sum()) > 0


def _pairs(folder, captions: list[str], labels: list[int] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"caption": captions, "jpg_0": [b"a"] * len(captions), "jpg_1": [b"b"] * len(captions),
                             "label_0": labels or [0] * len(captions)}), folder / "part-00000.parquet",
                   compression="none")


def _config(pairs) -> FinetuneConfig:
    return FinetuneConfig(model="sd15", data=[{"name": "pairs", "path": str(pairs)}], max_train_steps=4)


def _finished_run(out, cfg: FinetuneConfig, data: str | None, checkpoint: bool) -> None:
    from richpref.schemas.training import finetune_config_hash

    (out / "final").mkdir(parents=True)
    (out / "final" / "finetune.json").write_text(json.dumps(
        {"steps": 4, "config_hash": finetune_config_hash(cfg), **({"data_key": data} if data else {})}))
    if checkpoint:
        (out / "checkpoint-4").mkdir()
        (out / "checkpoint-4" / "trainer_state.json").write_text(json.dumps(
            {"global_step": 4, "config_hash": finetune_config_hash(cfg), **({"data_key": data} if data else {})}))


def test_the_data_key_follows_the_pairs_content_not_their_path(tmp_path):
    _pairs(tmp_path / "a", ["a cat", "a dog"])
    key = data_key(_config(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert data_key(_config(tmp_path / "copy")) == key  # moved or copied: the same pairs
    _pairs(tmp_path / "a", ["a cat", "a cow"])  # curated again at the same path
    assert data_key(_config(tmp_path / "a")) != key
    # the weights it starts from: a LoRA trained again at the same path is another start
    (tmp_path / "init.safetensors").write_bytes(b"lora one")
    continued = _config(tmp_path / "copy").model_copy(update={"init_from": str(tmp_path / "init.safetensors"),
                                                                      "mode": "lora"})
    start = data_key(continued)
    assert start != key and data_key(continued) == start
    (tmp_path / "init.safetensors").write_bytes(b"lora two")
    assert data_key(continued) != start


@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_run_on_pairs_curated_again_is_neither_done_nor_resumed(tmp_path, checkpoint):
    # before: finished() and the resume check read the config alone, so a finetune after a new curate of
    # the same run said "already trained" and kept the model of the old pairs (the curate-launched
    # finetune deployment too), or resumed a checkpoint of the old pairs on the new ones
    _pairs(tmp_path / "pairs", ["a cat", "a dog"])
    cfg = _config(tmp_path / "pairs")
    _finished_run(tmp_path / "out", cfg, data_key(cfg), checkpoint)
    assert finished(cfg, tmp_path / "out") is not None
    _pairs(tmp_path / "pairs", ["a cat", "a cow"])
    assert finished(cfg, tmp_path / "out") is None
    with pytest.raises(OtherConfig, match="was trained on other pairs, or from other init_from weights, than the "
                                          "config.s now .*give a new --output-dir"):
        check_resumable(cfg, tmp_path / "out")


def test_pairs_relabelled_with_the_same_footer_are_other_pairs_and_a_footer_key_of_before_is_still_read(tmp_path):
    _pairs(tmp_path / "pairs", ["a cat", "a dog", "a cow"], labels=[0, 1, 0])
    cfg = _config(tmp_path / "pairs")
    before = data_key(cfg, footers_only=True)  # what earlier versions recorded
    _finished_run(tmp_path / "out", cfg, before, checkpoint=True)
    assert finished(cfg, tmp_path / "out") is not None and check_resumable(cfg, tmp_path / "out")[0] == 4
    now = data_key(cfg)
    _pairs(tmp_path / "pairs", ["a cat", "a dog", "a cow"], labels=[1, 0, 0])  # relabelled: the footer unchanged
    assert data_key(cfg, footers_only=True) == before  # before: the same key, a resume went on with other labels
    assert data_key(cfg) != now
    shutil.rmtree(tmp_path / "out")
    _finished_run(tmp_path / "out", cfg, now, checkpoint=True)
    assert finished(cfg, tmp_path / "out") is None
    with pytest.raises(OtherConfig, match="was trained on other pairs"):
        check_resumable(cfg, tmp_path / "out")


def test_a_folder_recorded_before_data_keys_is_taken_as_the_same_pairs(tmp_path):
    _pairs(tmp_path / "pairs", ["a cat"])
    cfg = _config(tmp_path / "pairs")
    _finished_run(tmp_path / "out", cfg, None, checkpoint=True)
    assert finished(cfg, tmp_path / "out") is not None
    assert check_resumable(cfg, tmp_path / "out")[0] == 4


def test_only_complete_checkpoints_count_in_step_order(tmp_path):
    from richpref.training.checkpoints import TRAINER_STATE, checkpoints

    for name, state in [("checkpoint-9", True), ("checkpoint-10", True), ("checkpoint-12", False),
                        ("checkpoint-14.tmp", True), ("final", True)]:
        (tmp_path / name).mkdir()
        if state:
            (tmp_path / name / TRAINER_STATE).write_text("{}")
    # checkpoint-12: its trainer state never written (a save cut short, a partial copy); .tmp: a save in progress
    assert checkpoints(tmp_path) == [(9, tmp_path / "checkpoint-9"), (10, tmp_path / "checkpoint-10")]
    assert checkpoints(tmp_path / "missing") == []


def test_a_checkpoint_of_another_config_names_the_settings_that_changed(tmp_path):
    # before, the refusal gave two hashes only: which of a --set's or an edited config's values made the
    # checkpoints another run's was left to the user to find
    from richpref.training.launcher import write_config

    _pairs(tmp_path / "pairs", ["a cat"])
    made = _config(tmp_path / "pairs")
    _finished_run(tmp_path / "out", made, data_key(made), checkpoint=True)
    write_config(made, tmp_path / "out")
    now = made.model_copy(update={"loss_mask": "edit_region", "beta": 2500.0, "max_train_steps": 8})
    with pytest.raises(OtherConfig) as refused:
        check_resumable(now, tmp_path / "out")
    assert '; changed: beta: 5000.0 → 2500.0, loss_mask: "none" → "edit_region"): give a new --output-dir' in str(refused.value)
    shutil.copytree(tmp_path / "pairs", tmp_path / "moved")
    other_pairs = made.model_copy(update={"data": [made.data[0].model_copy(update={"path": str(tmp_path / "moved")})]})
    with pytest.raises(OtherConfig, match=r'changed: data\[0\].path: ".*pairs" → ".*moved"\)'):
        check_resumable(other_pairs, tmp_path / "out")
    # a written config that is not the one the checkpoints were made with (edited since) says nothing of them
    write_config(now, tmp_path / "out")
    with pytest.raises(OtherConfig) as refused:
        check_resumable(made.model_copy(update={"beta": 1.0}), tmp_path / "out")
    assert "changed" not in str(refused.value)
