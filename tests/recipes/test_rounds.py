"""RPO rounds on the tiny models: two rounds, the table across them, and a run killed in round 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from richpref.run.storage import RunStore
from run_sizes import ONE_REWARD

REPO = Path(__file__).resolve().parents[2]
CONFIG = "rounds-tiny"


def _overrides(models: Path) -> list[str]:
    # Each round's curate keeps one voting reward (tests/run_sizes.py); the evaluation scores every reward.
    return [f"models_root={models}", f"curate_overrides={json.dumps(['source.limit=4', *ONE_REWARD])}",
            'evaluate_overrides=["prompts.limit=2"]']


def _work_log(data: Path, run: str) -> list[dict]:
    return RunStore(str(data), run).read_log("work.jsonl")


def _samples(data: Path, run: str) -> dict[str, tuple[int, bytes]]:
    store = RunStore(str(data), run)
    out = {}
    for s in store.shards("sample"):
        t = store.read_shard("sample", s)
        for r in t.select(["item_id", "seed", "image"]).to_pylist():
            out[r["item_id"]] = (r["seed"], r["image"])
    return out


@pytest.fixture(scope="module")
def two_rounds(prefect_harness, tiny_models, tmp_path_factory):
    """One uninterrupted two-round run, shared by the tests below."""
    from richpref.ops.entrypoints import ROUNDS, load_flow

    data = tmp_path_factory.mktemp("rounds")
    result = load_flow(ROUNDS)(config=CONFIG, overrides=_overrides(tiny_models), data_dir=str(data))
    return data, result


def test_round_two_samples_with_round_one_weights(two_rounds):
    data, _ = two_rounds
    base, tuned = _samples(data, "rounds-tiny-round-1"), _samples(data, "rounds-tiny-round-2")
    assert base.keys() == tuned.keys() and len(base) == 4  # the same prompts (item ids) ...
    assert all(base[i][0] == tuned[i][0] for i in base)  # ... and seeds
    assert all(base[i][1] != tuned[i][1] for i in base), "round 2 sampled as the base model: the LoRA is not applied"


def test_round_one_weights_are_refused_by_a_sampler_of_another_family(two_rounds, tiny_models, tiny_flux):
    # before, diffusers loaded none of the SD 1.5 LoRA into FLUX.1 (and said so only in a log line),
    # and the untuned FLUX.1 sampled under the LoRA's name
    from richpref.doctor.checks import resolve_models
    from richpref.models.tuned import TunedWeightsError, apply_tuned
    from richpref.schemas.config import ProfileError, load_profile

    data, _ = two_rounds
    tuned = data / "rounds" / "rounds-tiny" / "round-1" / "finetune"
    with pytest.raises(ProfileError, match=r"sample.lora .* was tuned on a sd15 model, and this is a flux_dev checkpoint \(sample.model 'flux'\)"):
        resolve_models(load_profile("tiny-flux", [f"sample.lora={tuned}"], str(tiny_models)), {"sample"})
    resolve_models(load_profile("tiny", [f"sample.lora={tuned}"], str(tiny_models)), {"sample"})
    from richpref.schemas.training import load_evaluate_config
    from richpref.training.evaluation import preflight

    models = f"models=[{{name: base, path: flux}}, {{name: t, path: flux, lora: {tuned}}}]"
    with pytest.raises(ValueError, match=r"evaluate model 't': its lora .* was tuned on a sd15 model, and this is a flux_dev checkpoint \(flux\)"):
        preflight(load_evaluate_config("evaluate-tiny-flux", [f"models_root={tiny_models}", models]))
    with pytest.raises(TunedWeightsError, match=r"none of its weights fit this pipeline's transformer \(FluxTransformer2DModel\)"):
        apply_tuned(tiny_flux, lora=str(tuned))


def test_table_has_base_and_both_rounds(two_rounds):
    data, result = two_rounds
    out = data / "rounds" / "rounds-tiny"
    table = pq.read_table(out / "table.parquet").to_pylist()
    assert [r["model"] for r in table] == ["base", "round-1", "round-2"] and [r["round"] for r in table] == [0, 1, 2]
    assert {"pickscore", "imagereward", "aesthetic", "hpsv2", "flip_rate", "pairs_kept"} <= set(table[0])
    assert table[0]["pairs_kept"] is None and table[0]["flip_rate"] is None
    for k in (1, 2):  # each round's figures are its own run's: its pairs, the share of them that flipped
        parts = sorted((data / "runs" / f"rounds-tiny-round-{k}" / "pairs").glob("part-*.parquet"))
        flipped = [f for p in parts for f in pq.read_table(p, columns=["flipped"]).column("flipped").to_pylist()]
        assert table[k]["pairs_kept"] == len(flipped) > 0
        assert table[k]["flip_rate"] == pytest.approx(sum(flipped) / len(flipped))
    assert table == result["table"]
    assert (out / "table.md").read_text().count("\n") == 5 and (out / "rewards.png").stat().st_size > 0


def test_round_two_finetunes_from_round_one(two_rounds, tmp_path):
    from richpref.schemas.training import load_finetune_config
    from richpref.training.models import read_meta
    from richpref.training.train import train
    from richpref.models.tuned import lora_file
    from safetensors.torch import load_file

    data, _ = two_rounds
    round1 = data / "rounds" / "rounds-tiny" / "round-1" / "finetune"
    meta = read_meta(data / "rounds" / "rounds-tiny" / "round-2" / "finetune")
    assert meta["config"]["init_from"] == str(round1) and meta["config"]["reference"] == "init"
    assert read_meta(round1)["config"]["init_from"] is None
    # a Flow-DPO config's caption embeddings: one cache in the rounds folder, not one per round
    assert meta["config"]["text_cache_dir"] == read_meta(round1)["config"]["text_cache_dir"] == str(round1.parents[1])
    # Training from round 1's LoRA with a vanishing learning rate ends where round 1 ended.
    cfg = load_finetune_config("finetune-tiny", [f"models_root={meta['config']['models_root']}", f"init_from={round1}",
                                                 "learning_rate=1.0e-12", "max_train_steps=1", "weight_decay=0",
                                                 f"data=[{{name: pairs, path: {data / 'runs' / 'rounds-tiny-round-1' / 'pairs'}}}]"])
    train(cfg, tmp_path / "again")
    before, after = load_file(lora_file(round1)), load_file(lora_file(tmp_path / "again"))
    assert before.keys() == after.keys()
    assert any(v.abs().max() > 1e-4 for v in before.values())  # round 1 moved its LoRA away from zero
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def _round_one_of(src: Path, dst: Path) -> None:
    """Round 1 of the finished two-round run in `src`, copied into `dst` as a run stopped after round 1
    leaves it: round 1's curate run, its fine-tune, and rounds.json with round 1's record (paths moved)."""
    import shutil

    out = Path("rounds") / CONFIG
    shutil.copytree(src / "runs" / f"{CONFIG}-round-1", dst / "runs" / f"{CONFIG}-round-1")
    shutil.copytree(src / out / "round-1", dst / out / "round-1")
    state = json.loads((src / out / "rounds.json").read_text())
    state["rounds"] = {"1": state["rounds"]["1"]}
    (dst / out / "rounds.json").write_text(json.dumps(state, indent=2).replace(str(src), str(dst)))


def test_killed_in_round_two_then_rerun_continues_there(two_rounds, tiny_models, tmp_path, prefect_api_env):
    """SIGKILL right after round 2's curate; the rerun skips round 1 and ends with the same table.
    Round 1 comes from the uninterrupted run (the first process skips it too): only round 2 is computed."""
    from richpref.ops.entrypoints import ROUNDS, load_flow
    from richpref.recipes.rounds import FAULTS_ENV

    ref_data, reference = two_rounds
    data = tmp_path / "data"
    _round_one_of(ref_data, data)
    copied_work = _work_log(data, "rounds-tiny-round-1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({"PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"), FAULTS_ENV: "2:curate",
                "RICHPREF_PID_DIR": str(tmp_path / "pids"), **prefect_api_env})  # the session's Prefect API
    cmd = [sys.executable, "-m", "richpref.cli.commands", "--data-dir", str(data), "rounds", "--config", CONFIG,
           *(x for o in _overrides(tiny_models) for x in ("--set", o))]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = json.loads((data / "rounds" / "rounds-tiny" / "rounds.json").read_text())
    assert list(state["rounds"]) == ["1"]
    round1_work = _work_log(data, "rounds-tiny-round-1")
    round2_work = _work_log(data, "rounds-tiny-round-2")
    metrics = (data / "rounds" / "rounds-tiny" / "round-1" / "finetune" / "metrics.jsonl").read_text()
    assert round1_work == copied_work and round2_work  # the killed process did not redo round 1 either

    result = load_flow(ROUNDS)(config=CONFIG, overrides=_overrides(tiny_models), data_dir=str(data))
    assert _work_log(data, "rounds-tiny-round-1") == round1_work  # round 1 not recomputed
    assert _work_log(data, "rounds-tiny-round-2") == round2_work  # nor round 2's finished curate
    assert (data / "rounds" / "rounds-tiny" / "round-1" / "finetune" / "metrics.jsonl").read_text() == metrics
    assert result["table"] == reference["table"]


def test_tuned_weights_are_in_the_sample_key(tmp_path):
    """sample.lora's bytes, not only its path, are in the sample stage's key; no weights: no change."""
    from richpref.schemas.config import ProfileError, load_profile
    from richpref.tasks.sample import STAGE

    lora = tmp_path / "tuned" / "pytorch_lora_weights.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(b"one")
    plain = STAGE.key_extra(load_profile("tiny"))
    first = STAGE.key_extra(load_profile("tiny", [f"sample.lora={lora.parent}"]))
    lora.write_bytes(b"two!")
    second = STAGE.key_extra(load_profile("tiny", [f"sample.lora={lora.parent}"]))
    assert plain == "" and first and second and first != second
    with pytest.raises(ProfileError, match="exclusive"):
        load_profile("tiny", [f"sample.lora={lora.parent}", f"sample.unet={tmp_path}"])


def test_the_command_refuses_a_missing_model_before_round_one_and_ends_a_failed_round_in_one_line(
        tiny_models, tmp_path, capsys, monkeypatch):
    import richpref.ops.entrypoints as entrypoints
    from richpref.cli.commands import main
    from richpref.run.runner import CurateFailed

    data = str(tmp_path / "data")
    assert main(["--data-dir", data, "rounds", "--models-root", str(tmp_path / "nowhere")]) == 3
    err = capsys.readouterr().err
    assert "sample: model 'sd15' cannot be loaded" in err and str(tmp_path / "nowhere" / "sd15") in err

    def failing_round(*args, **kwargs):
        raise CurateFailed("1 shard(s) failed; fix the cause and rerun the same command to redo only those")

    monkeypatch.setattr(entrypoints, "run_flow", failing_round)
    assert main(["--data-dir", data, "rounds", "--models-root", str(tiny_models)]) == 1
    assert capsys.readouterr().err.startswith("error: 1 shard(s) failed")


@pytest.mark.parametrize("override, code, named", [
    ('evaluate_overrides=["prompts.path=nowhere.txt"]', 2, "evaluate.prompts: source.path 'nowhere.txt'"),
    ('evaluate_overrides=["rewards.pickscore.model=nowhere"]', 3, "model 'nowhere' not found"),
    ('finetune_overrides=["model=nowhere"]', 3, "model 'nowhere' not found"),
    ('finetune_overrides=["arch=flux"]', 2, "is a sd15 checkpoint but the config says arch: flux"),
    # round 1 from FLUX.1, tuning SD 1.5: before, round 2 loaded the SD 1.5 LoRA into FLUX.1, where none of
    # it fits, and sampled the untuned FLUX.1 under the LoRA's name
    ("profile=tiny-flux", 2, "rounds: the profile samples with 'flux' (a flux_dev checkpoint) and the fine-tune tunes "
                             "'sd15' (a sd15 one)")])
def test_the_fine_tune_and_evaluation_of_each_round_are_checked_before_round_one(tiny_models, tmp_path, capsys,
                                                                                   monkeypatch, override, code, named):
    # before, round 1 curated, then its fine-tune or evaluation failed
    import richpref.ops.entrypoints as entrypoints
    from richpref.cli.commands import main

    monkeypatch.setattr(entrypoints, "run_flow", lambda *a, **k: pytest.fail("round 1 started"))
    args = ["--data-dir", str(tmp_path), "rounds", "--models-root", str(tiny_models), "--set", override]
    assert main(args) == code
    assert named in capsys.readouterr().err


def test_rounds_of_a_full_flow_dpo_fine_tune_are_refused_before_round_one(tiny_models, tmp_path, capsys, monkeypatch):
    # before, round 1 curated and fine-tuned, then round 2 failed: it samples with round 1's weights as
    # sample.unet, which names a UNet, and Flow-DPO continues LoRA runs only
    import richpref.ops.entrypoints as entrypoints
    from richpref.cli.commands import main

    monkeypatch.setattr(entrypoints, "run_flow", lambda *a, **k: pytest.fail("round 1 started"))
    sets = ["profile=tiny-flux", "finetune=finetune-tiny-flux", "evaluate=evaluate-tiny-flux", 'finetune_overrides=["mode=full"]']
    args = ["--data-dir", str(tmp_path), "rounds", "--models-root", str(tiny_models), *(a for s in sets for a in ("--set", s))]
    assert main(args) == 2
    assert "rounds: 2 rounds of a full fine-tune of 'flux' (a flux flow-matching model)" in capsys.readouterr().err
    monkeypatch.setattr(entrypoints, "run_flow", lambda *a, **k: {"markdown": "", "rounds_dir": "-"})
    assert main([*args, "--set", "rounds=1"]) == 0  # one round continues from nothing


def test_an_edit_region_fine_tune_is_not_refused_before_round_one_makes_its_masked_pairs(tiny_models, tmp_path,
                                                                                        monkeypatch):
    # before: round 1's fine-tune was checked without its pairs, so no source had masks: "no file of data
    # source(s) [] has an 'edit_mask' column"
    import richpref.ops.entrypoints as entrypoints
    from richpref.cli.commands import main

    monkeypatch.setattr(entrypoints, "run_flow", lambda *a, **k: {"markdown": "", "rounds_dir": "-"})
    args = ["--data-dir", str(tmp_path), "rounds", "--models-root", str(tiny_models), "--set",
            'finetune_overrides=["loss_mask=edit_region"]']
    assert main(args) == 0


def test_the_flow_checks_every_round_before_round_one(prefect_harness, tiny_models, tmp_path, monkeypatch):
    # a deployment runs the flow without the command: before, it curated and fine-tuned round 1 of a
    # full Flow-DPO fine-tune, then failed in round 2
    import flows.rounds as rounds_flow
    from richpref.ops.entrypoints import ROUNDS, load_flow

    monkeypatch.setattr(rounds_flow, "curate", lambda **k: pytest.fail("round 1 started"))
    sets = ["profile=tiny-flux", "finetune=finetune-tiny-flux", "evaluate=evaluate-tiny-flux",
            'finetune_overrides=["mode=full"]', f"models_root={tiny_models}"]
    with pytest.raises(ValueError, match="rounds: 2 rounds of a full fine-tune of 'flux'"):
        load_flow(ROUNDS)(config=CONFIG, overrides=sets, data_dir=str(tmp_path))


def test_prompts_next_takes_each_rounds_slice_within_the_source_limit_and_offset(tmp_path):
    # before: a round's slice replaced source.limit, so round 2 of limit 8 and 6 prompts a round read
    # rows 6..11, past the rows the user had bounded the source to
    from richpref.recipes.rounds import prompt_slice, round_prompts
    from richpref.schemas.rounds import load_rounds_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(20)))

    def rounds_slice(k: int, *source: str, rounds: int = 2) -> list[str]:
        curate = json.dumps(["source.kind=prompts", f"source.path={prompts}", *source])
        cfg = load_rounds_config(CONFIG, ["prompts=next", "prompts_per_round=6", f"rounds={rounds}",
                                          f"curate_overrides={curate}"])
        return Path(prompt_slice(cfg, k, str(tmp_path / "data"), round_prompts(cfg)[k - 1])).read_text().splitlines()

    assert rounds_slice(1) == [f"prompt {i}" for i in range(6)]
    assert rounds_slice(2) == [f"prompt {i}" for i in range(6, 12)]
    assert rounds_slice(2, "source.limit=8") == ["prompt 6", "prompt 7"]
    assert rounds_slice(2, "source.offset=3", "source.limit=10") == [f"prompt {i}" for i in range(9, 13)]
    with pytest.raises(ValueError, match=r"round 3: the source has no usable row 12 or later \(source.limit is 8\)"):
        rounds_slice(1, "source.limit=8", rounds=3)  # round 1 too: the whole plan is refused before it starts


def test_the_command_refuses_rounds_the_source_has_no_rows_for_before_round_one(tiny_models, tmp_path, capsys,
                                                                                monkeypatch):
    import richpref.ops.entrypoints as entrypoints
    from richpref.cli.commands import main

    monkeypatch.setattr(entrypoints, "run_flow", lambda *a, **k: pytest.fail("round 1 started"))
    sets = ["prompts=next", "prompts_per_round=6", "rounds=3"]  # rounds-tiny's source.limit is 8
    args = ["--data-dir", str(tmp_path), "rounds", "--models-root", str(tiny_models), *(a for s in sets for a in ("--set", s))]
    assert main(args) == 2
    assert "round 3: the source has no usable row 12 or later (source.limit is 8)" in capsys.readouterr().err


def test_rounds_of_another_config_under_the_same_name_are_refused_naming_the_change(tiny_models, tmp_path, capsys,
                                                                                   monkeypatch):
    # before: the rounds record was started afresh, round 1 curated its run again under the new profile
    # (replacing the recorded round's pairs), and only its fine-tune refused the checkpoints it found
    import richpref.ops.entrypoints as entrypoints
    from richpref.cli.commands import main
    from richpref.recipes.rounds import OtherRounds, RoundsState
    from richpref.schemas.rounds import load_rounds_config

    data = str(tmp_path / "data")
    RoundsState(data, load_rounds_config(CONFIG, [f"models_root={tiny_models}"])).finish(1, {"round": 1})
    changed = ["curate_overrides=[\"source.limit=16\"]", "reference=base"]
    with pytest.raises(OtherRounds, match=r"holds round\(s\) 1 of another rounds config \(changed: curate_overrides\[0\]: "
                                          r'"source.limit=8" → "source.limit=16", reference: "previous" → "base"\): '
                                          r"give these rounds a name of their own \(--set name=rounds-tiny-2\)"):
        RoundsState(data, load_rounds_config(CONFIG, changed))
    # more rounds, another evaluation, the models moved: the rounds go on (found done by their keys)
    more = RoundsState(data, load_rounds_config(CONFIG, ["rounds=3", 'evaluate_overrides=["prompts.limit=1"]']))
    assert more.rounds == {}
    monkeypatch.setattr(entrypoints, "run_flow", lambda *a, **k: pytest.fail("round 1 started"))
    args = ["--data-dir", data, "rounds", "--models-root", str(tiny_models), *(a for s in changed for a in ("--set", s))]
    assert main(args) == 2
    assert "of another rounds config (changed: curate_overrides[0]" in capsys.readouterr().err


def test_the_rounds_table_puts_each_rounds_curate_figures_on_its_row():
    from richpref.recipes.rounds import rounds_table

    evaluated = [{"model": m, "images": 2, "pickscore": v} for m, v in (("base", 0.1), ("round-1", 0.2), ("round-2", 0.3))]
    rows = rounds_table(evaluated, [{"flip_rate": 0.25, "pairs_kept": 3}, {"flip_rate": 0.5, "pairs_kept": 4}])
    assert rows == [
        {"model": "base", "round": 0, "images": 2, "pickscore": 0.1, "flip_rate": None, "pairs_kept": None},
        {"model": "round-1", "round": 1, "images": 2, "pickscore": 0.2, "flip_rate": 0.25, "pairs_kept": 3},
        {"model": "round-2", "round": 2, "images": 2, "pickscore": 0.3, "flip_rate": 0.5, "pairs_kept": 4}]


def test_each_rounds_overrides_sample_and_start_from_the_round_before(tmp_path):
    from richpref.recipes.rounds import curate_overrides, finetune_overrides
    from richpref.schemas.rounds import load_rounds_config

    cfg = load_rounds_config(CONFIG, ["mix_previous=0.5", "models_root=/m"])
    assert curate_overrides(cfg, 1, str(tmp_path), None, None) == ["source.limit=8"]  # round 1: the profile's model
    lora, full = {"output_dir": "/r1", "mode": "lora"}, {"output_dir": "/r1", "mode": "full"}
    assert curate_overrides(cfg, 2, str(tmp_path), lora, None)[1:] == ['sample.lora="/r1"', "sample.use_dataset_image=false"]
    assert curate_overrides(cfg, 2, str(tmp_path), full, None)[1] == 'sample.unet="/r1"'
    sliced = load_rounds_config(CONFIG, ["prompts=next", "prompts_per_round=1"])
    second = curate_overrides(sliced, 2, str(tmp_path), None, [["a cat"], ["a dog"]])
    path = tmp_path / "rounds" / "rounds-tiny" / "round-2" / "prompts.txt"
    assert second[1:] == ['source.kind="prompts"', f'source.path="{path}"', "source.limit=null", "source.image_column=null",
                          "source.pickapic_preferred=false"] and path.read_text() == "a dog\n"
    assert finetune_overrides(cfg, None, []) == ['models_root="/m"']
    second = finetune_overrides(cfg, lora, ["/runs/r1/pairs"], "/rounds")
    assert second[:4] == ['models_root="/m"', 'text_cache_dir="/rounds"', 'init_from="/r1"', 'reference="init"']
    assert json.loads(second[4].split("=", 1)[1]) == [{"name": "pairs", "path": "data/runs/demo/pairs", "split": "train",
                                                       "weight": 1.0},
                                                      {"name": "round-1", "path": "/runs/r1/pairs", "weight": 0.5}]
    base = load_rounds_config(CONFIG, ["reference=base"])
    assert finetune_overrides(base, lora, ["/runs/r1/pairs"])[1:] == ['init_from="/r1"', 'reference="base"']  # no mixing
