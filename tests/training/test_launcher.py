"""The training launcher: a trainer that stops on bad input is not relaunched."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_finetune import tiny_config, write_pairs


def test_a_trainer_that_stops_on_bad_input_is_not_relaunched(tiny_models, tmp_path):
    from richpref.training.launcher import LaunchFailed, launch_training

    good = pq.read_table(write_pairs(tmp_path / "good.parquet", 4))
    jpg_1 = good.column("jpg_1").to_pylist()
    jpg_1[-1] = b"not an image"  # met only when the batch holding it is drawn
    path = tmp_path / "pairs.parquet"
    pq.write_table(good.set_column(good.schema.get_field_index("jpg_1"), "jpg_1", pa.array(jpg_1)), path)
    out = tmp_path / "run"
    cfg = tiny_config(tiny_models, path, train_batch_size=4, max_train_steps=2)
    with pytest.raises(LaunchFailed, match="cannot decode image") as err:
        launch_training(cfg, out, max_restarts=2, log_file=str(tmp_path / "train.log"))
    assert "not relaunched" in str(err.value)
    assert (tmp_path / "train.log").read_text().count("Traceback") <= 1  # one launch, not three
