"""Whether a finetune output folder holds a config's run: the pairs it trained on, by content (data key),
decide as much as the config does. Pairs curated again at the same path are not the pairs a finished
model or a checkpoint learned from."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from richpref.schemas.training import FinetuneConfig
from richpref.training.checkpoints import OtherConfig, check_resumable, data_key, finished


def _pairs(folder, captions: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"caption": captions, "jpg_0": [b"a"] * len(captions), "jpg_1": [b"b"] * len(captions),
                             "label_0": [0] * len(captions)}), folder / "part-00000.parquet")


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
    with pytest.raises(OtherConfig, match="was trained on other pairs than the config's now .*give a new --output-dir"):
        check_resumable(cfg, tmp_path / "out")


def test_a_folder_recorded_before_data_keys_is_taken_as_the_same_pairs(tmp_path):
    _pairs(tmp_path / "pairs", ["a cat"])
    cfg = _config(tmp_path / "pairs")
    _finished_run(tmp_path / "out", cfg, None, checkpoint=True)
    assert finished(cfg, tmp_path / "out") is not None
    assert check_resumable(cfg, tmp_path / "out")[0] == 4
