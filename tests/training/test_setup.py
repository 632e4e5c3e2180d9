"""Finetune, evaluate and rounds configs find their models as curate profiles do: `--models-root`, else
RICHPREF_MODELS_ROOT, else the config's own `models_root` (relative to the cwd). The preflight's refusals
of init_from weights that the run cannot continue."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from richpref.cli.commands import build_parser, main
from richpref.schemas.rounds import load_rounds_config
from richpref.schemas.training import PairSourceConfig, load_evaluate_config, load_finetune_config
from richpref.training.evaluation import preflight as evaluate_preflight
from richpref.training.finetune import with_pairs
from richpref.training.setup import preflight as finetune_preflight
from test_flow_step import flow_config, write_brightness_pairs


def test_finetune_and_evaluate_configs_honour_models_root(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the configs' own models_root (data/models/tiny) is not here
    root = str(tiny_models)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    pq.write_table(pa.table({"caption": ["c"], "jpg_0": [b""], "jpg_1": [b""], "label_0": [1.0]}),
                   pairs / "part-00000.parquet")  # the preflight reads footers, not images
    monkeypatch.setenv("RICHPREF_MODELS_ROOT", root)
    cfg = with_pairs(load_finetune_config("finetune-tiny-flux"), str(pairs))
    assert cfg.models_root == root and finetune_preflight(cfg) == "flux"
    ev = load_evaluate_config("evaluate-tiny-flux", ["models=[{name: base, path: flux}]"])
    assert ev.models_root == root
    assert load_rounds_config("rounds-tiny").models_root == root
    evaluate_preflight(ev)
    # an explicit root (the command's --models-root) wins over the environment
    assert load_finetune_config("finetune-tiny-sd3", models_root="/elsewhere").models_root == "/elsewhere"
    assert load_evaluate_config("evaluate-tiny-sd3", models_root="/elsewhere").models_root == "/elsewhere"
    assert load_rounds_config("rounds-tiny", models_root="/elsewhere").models_root == "/elsewhere"
    assert build_parser().parse_args(["rounds", "--models-root", "/elsewhere"]).models_root == "/elsewhere"

    monkeypatch.delenv("RICHPREF_MODELS_ROOT")
    assert load_finetune_config("finetune-tiny-flux").models_root == "data/models/tiny"
    assert load_rounds_config("rounds-tiny").models_root == "data/models/tiny"
    assert main(["doctor", "--finetune", "finetune-tiny-flux", "--models-root", root]) == 0
    assert "finetune finetune-tiny-flux: flux lora" in capsys.readouterr().out
    # the estimate, then what the launch would refuse (before: an estimate of a config that cannot train)
    assert main(["doctor", "--finetune", "finetune-tiny-flux", "--models-root", root, "--set", "resolution=70"]) == 2
    out, err = capsys.readouterr()
    assert "finetune finetune-tiny-flux: flux lora" in out and err.startswith("error: resolution 70: flux_dev models take")
    for command in (["finetune", "--config", "finetune-tiny-flux", "--set", "model=gone"],
                    ["evaluate", "--config", "evaluate-tiny-flux", "--set", "models=[{name: a, path: gone}]"]):
        args = ["--data-dir", str(tmp_path / "data"), *command, "--models-root", "/no/such/root"]
        assert main(args) == 3  # refused before Prefect starts, naming the root it looked in (3: a model)
        assert "looked in /no/such/root/" in capsys.readouterr().err


def test_finetune_refuses_a_pairs_path_without_parquet_before_prefect_starts(tiny_models, tmp_path, capsys):
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "finetune", "--config", "finetune-tiny-flux", "--models-root", str(tiny_models),
            "--pairs", str(tmp_path / "no-pairs-here")]
    assert main(args) == 2  # 1 (and a Prefect traceback) once the flow had launched accelerate
    assert f"data source path '{tmp_path / 'no-pairs-here'}' has no .parquet files" in capsys.readouterr().err
    assert not (data / "finetune").exists()


def test_finetune_refuses_pairs_of_a_run_that_kept_none_before_prefect_starts(tiny_models, tmp_path, capsys):
    # before: accelerate started, `datasets` failed ("Instruction 'train' corresponds to no data!"), twice
    pairs = tmp_path / "runs" / "none-kept" / "pairs"
    pairs.mkdir(parents=True)
    (pairs.parent / "run.json").write_text("{}")  # a run's folder: its run.json beside pairs/
    empty = pa.table({"caption": pa.array([], pa.string()), "jpg_0": pa.array([], pa.binary()),
                      "jpg_1": pa.array([], pa.binary()), "label_0": pa.array([], pa.float64())})
    for shard in range(2):
        pq.write_table(empty, pairs / f"part-0000{shard}.parquet")
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "finetune", "--config", "finetune-tiny-flux", "--models-root", str(tiny_models),
            "--pairs", str(pairs)]
    assert main(args) == 2
    assert f"data source 'pairs': {pairs} holds no pairs (its 2 Parquet file(s) have 0 rows); a run that kept none: " \
           "`richpref summary none-kept` shows why" in capsys.readouterr().err
    assert not (data / "finetune").exists()
    from richpref.schemas.training import PairSourceConfig
    from richpref.training.data import DataError, load_pair_source

    with pytest.raises(DataError, match="holds no pairs"):  # the trainer's own read says the same
        load_pair_source(PairSourceConfig(path=str(pairs)))


def test_finetune_refuses_a_pairs_file_that_is_no_parquet_or_lacks_a_column_before_prefect_starts(tiny_models, tmp_path,
                                                                                                    capsys):
    data, pairs = tmp_path / "data", tmp_path / "pairs"
    pairs.mkdir()
    good = {"caption": ["c"], "jpg_0": [b""], "jpg_1": [b""], "label_0": [1.0]}
    pq.write_table(pa.table(good), pairs / "a.parquet")
    pq.write_table(pa.table({k: v for k, v in good.items() if k != "label_0"}), pairs / "b.parquet")
    args = ["--data-dir", str(data), "finetune", "--config", "finetune-tiny-flux", "--models-root", str(tiny_models),
            "--pairs", str(pairs)]
    assert main(args) == 2
    assert f"data source 'pairs': {pairs / 'b.parquet'} lacks column(s) ['label_0']" in capsys.readouterr().err
    (pairs / "b.parquet").write_bytes(b"not parquet")
    assert main(args) == 2  # before: accelerate launched twice, then "see train.log"
    err = capsys.readouterr().err
    assert f"data source 'pairs': {pairs / 'b.parquet'} is not a readable Parquet file" in err and "magic bytes" in err
    assert not (data / "finetune").exists()


def test_edit_region_needs_edit_masks_in_some_source_and_in_all_of_a_sources_files(tiny_models, tmp_path):
    pair = {"caption": ["c"], "jpg_0": [b""], "jpg_1": [b""], "label_0": [1.0]}
    for name, columns in (("masked", {**pair, "edit_mask": pa.array([None], pa.binary())}), ("plain", pair)):
        (tmp_path / name).mkdir()
        pq.write_table(pa.table(columns), tmp_path / name / "part-00000.parquet")
    cfg = load_finetune_config("finetune-tiny-flux", ["loss_mask=edit_region"], models_root=str(tiny_models))

    def sources(*names: str):
        return cfg.model_copy(update={"data": [PairSourceConfig(name=n, path=str(tmp_path / n)) for n in names]})

    # before, a source without masks was refused beside a masked one: its pairs now weigh the whole image
    assert finetune_preflight(sources("masked", "plain")) == "flux"
    with pytest.raises(ValueError, match=r"edit_region, but no file of data source\(s\) \['plain'\] has an 'edit_mask'"):
        finetune_preflight(sources("plain"))
    pq.write_table(pa.table(pair), tmp_path / "masked" / "part-00001.parquet")  # one source, read as one table
    with pytest.raises(ValueError, match=r"data source 'masked': .*part-00001.parquet has no 'edit_mask' column and "
                                         r".*part-00000.parquet has one"):
        finetune_preflight(sources("masked", "plain"))


def test_a_lora_target_the_network_lacks_is_refused_before_the_launch(tiny_models):
    # before, both launches failed on PEFT's NoMatchingPeftModuleError after the models loaded
    import pytest

    from richpref.training.flow_models import ArchMismatch

    for config, targets in (("finetune-tiny", "[to_q, nosuch]"), ("finetune-tiny-flux", "[attn.to_q, to_qq]")):
        cfg = load_finetune_config(config, [f"lora.target_modules={targets}", "data=[]"], str(tiny_models))
        with pytest.raises(ArchMismatch, match=r"lora.target_modules \['(nosuch|to_qq)'\]: no module of the "
                                               r"(unet|transformer) of '(sd15|flux)' ends with that name"):
            finetune_preflight(cfg)
    # a dotted tail and the family's defaults pass (the UNet default means the transformer's own on FLUX)
    finetune_preflight(load_finetune_config("finetune-tiny-flux", ["lora.target_modules=[to_out.0, ff.net.2]", "data=[]"],
                                            str(tiny_models)))
    finetune_preflight(load_finetune_config("finetune-tiny-flux", ["lora.target_modules=[to_k, to_q, to_v, to_out.0]",
                                                                   "data=[]"], str(tiny_models)))


def test_pairs_at_a_store_url_without_credentials_are_a_data_error_naming_the_variables(no_store_credentials):
    # before, botocore's NoCredentialsError traceback from the finetune preflight (it is no OSError)
    import pytest

    from richpref.training.data import DataError, pair_files

    with pytest.raises(DataError, match=r"data source path 's3://no-such-bucket/pairs/' cannot be listed "
                                        r"\(NoCredentialsError: .*set AWS_ACCESS_KEY_ID"):
        pair_files("s3://no-such-bucket/pairs/")


def test_init_from_made_for_another_base_mode_or_lora_settings_is_refused(tiny_models, tmp_path):
    import torch
    from safetensors.torch import save_file

    from richpref.training.flow_models import ArchMismatch
    from richpref.training.setup import preflight

    pairs = write_brightness_pairs(tmp_path / "pairs.parquet", 8)
    # init_from made for another base (its finetune.json says so)
    other = tmp_path / "sd15-lora"
    other.mkdir()
    (other / "finetune.json").write_text(json.dumps({"arch": "sd15", "mode": "lora"}))
    with pytest.raises(ArchMismatch, match=r"init_from .*made for a sd15 model.*drop init_from"):
        preflight(flow_config(tiny_models, pairs, "flux", init_from=str(other)))
    # init_from of the other mode: before, each launch of the trainer failed on it after the models loaded
    lora = {"unet.a.to_q.lora_A.weight": torch.zeros(8, 16), "unet.a.to_q.lora_B.weight": torch.zeros(16, 8)}
    save_file(lora, other / "pytorch_lora_weights.safetensors")  # a LoRA output: no UNet to continue in full
    with pytest.raises(ArchMismatch, match=r"init_from .*sd15-lora \(mode: full\): UNet weights .*no diffusers UNet folder"):
        preflight(flow_config(tiny_models, pairs, "sd15", flow=None, mode="full", init_from=str(other)))
    assert preflight(flow_config(tiny_models, pairs, "sd15", flow=None, init_from=str(other))) == "sd15"
    # a LoRA of other lora: settings (before: a size-mismatch traceback at each launch, or another scale)
    with pytest.raises(ArchMismatch, match=r"trained with rank 8 \(lora.rank is 4\): continue it"):
        preflight(flow_config(tiny_models, pairs, "sd15", flow=None, lora={"rank": 4}, init_from=str(other)))
    trained = {"rank": 8, "alpha": 16, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}
    (other / "finetune.json").write_text(json.dumps({"arch": "sd15", "mode": "lora", "config": {"lora": trained}}))
    with pytest.raises(ArchMismatch, match=r"trained with alpha 16 \(lora.alpha is 8\): continue it with the lora: "
                                           r"settings it was trained with, or drop init_from"):
        preflight(flow_config(tiny_models, pairs, "sd15", flow=None, init_from=str(other)))
    with pytest.raises(ArchMismatch, match=r"trained with target_modules \['to_q', 'to_k', 'to_v', 'to_out.0'\] "
                                           r"\(lora.target_modules is \['to_q'\]\)"):
        preflight(flow_config(tiny_models, pairs, "sd15", flow=None, lora={"rank": 8, "alpha": 16, "target_modules": ["to_q"]},
                              init_from=str(other)))
    assert preflight(flow_config(tiny_models, pairs, "sd15", flow=None, lora={"rank": 8, "alpha": 16}, init_from=str(other)))
    (other / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ArchMismatch, match=r"its LoRA weights cannot be read"):
        preflight(flow_config(tiny_models, pairs, "sd15", flow=None, init_from=str(other)))
    save_file(lora, other / "pytorch_lora_weights.safetensors")
    (other / "finetune.json").write_text(json.dumps({"arch": "flux", "mode": "lora"}))
    with pytest.raises(ArchMismatch, match=r"with mode: full: Flow-DPO continues LoRA runs only; use mode: lora"):
        preflight(flow_config(tiny_models, pairs, "flux", mode="full", fsdp=True, gradient_checkpointing=True,
                              init_from=str(other)))
    (other / "finetune.json").write_text(json.dumps({"arch": "sd15", "mode": "lora"}))
