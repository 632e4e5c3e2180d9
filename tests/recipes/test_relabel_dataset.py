"""`richpref relabel-dataset` (richpref/recipes/relabel_dataset.py): an existing Pick-a-Pic dataset relabelled
from the command line with the relabel stage's rules, the settings it takes from a profile and the
ones it refuses; a run of the shard runner (`pipeline: relabel_dataset`) that resumes where it stopped.
The relabel stage itself is tests/tasks/test_relabel.py."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from relabel_helpers import _image, card_images_uploaded, solid
from richpref.schemas.config import RelabelConfig, RewardModel, ScoreConfig, SubjectGateConfig, load_profile
from image_helpers import encoded


def _jpeg(im):
    return encoded(im, "JPEG", quality=90)


def test_relabel_dataset_cli_rewrites_label_0_and_drops_ties(tiny_models, tmp_path):
    import datasets

    from richpref.cli.commands import main
    from richpref.models.rewards import load_reward

    rng = np.random.default_rng(5)
    a = [_jpeg(_image(rng)) for _ in range(5)]
    b = [_jpeg(_image(rng)) for _ in range(5)]
    b[3] = a[3]  # identical images: a tie, dropped
    a[4] = b"\xff\xd8 broken jpeg"  # undecodable: dropped with a reason
    captions = ["a red bicycle", "three green apples", "a cat in a box", "a lighthouse", "a teapot"]
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"caption": captions, "jpg_0": a, "jpg_1": b, "label_0": [1.0, 0.0, 0.5, 1.0, 0.0],
                             "ranking_id": [10, 11, 12, 13, 14]}), src / "train-0.parquet")
    # the same rows as a `datasets` Image column ({bytes, path} structs), as Hub Parquet exports store them
    feats = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(), "jpg_1": datasets.Image()})
    datasets.Dataset.from_dict({"caption": captions[:2], "jpg_0": [{"bytes": x, "path": None} for x in a[:2]],
                                "jpg_1": [{"bytes": x, "path": None} for x in b[:2]]}, features=feats).to_parquet(str(src / "train-1.parquet"))

    out = tmp_path / "relabelled"
    rc = main(["relabel-dataset", str(src / "*.parquet"), str(out), "--profile", "tiny", "--reward", "clip",
               "--models-root", str(tiny_models)])
    assert rc == 0
    clip = load_reward("clip", str(tiny_models / "clip"), device="cpu")
    dec = lambda x: Image.open(io.BytesIO(x)).convert("RGB")  # noqa: E731
    s0 = clip.score([dec(x) for x in a[:3]], captions[:3])
    s1 = clip.score([dec(x) for x in b[:3]], captions[:3])
    want = [1 if x > y else 0 for x, y in zip(s0, s1)]

    pairs = out / "runs" / "relabel" / "pairs"  # the run's pairs folder, as curate's
    first = pq.read_table(pairs / "part-00000.parquet").to_pylist()
    assert [r["ranking_id"] for r in first] == [10, 11, 12]  # tie (13) and broken (14) dropped, other columns kept
    assert [r["label_0"] for r in first] == want
    assert [r["label_0_source"] for r in first] == [1.0, 0.0, 0.5]
    assert all(r["jpg_0"] == a[k] and r["jpg_1"] == b[k] for k, r in enumerate(first))  # bytes untouched
    second = pq.read_table(pairs / "part-00001.parquet")
    assert second.schema.field("jpg_0").type == pa.binary()  # structs become raw bytes, as the trainers read them
    assert second.column("label_0").to_pylist() == want[:2]  # standardised per shard: the order within a pair is what counts

    summary = json.loads((out / "runs" / "relabel" / "relabel.json").read_text())
    assert (summary["rows"], summary["kept"], summary["rejected"]) == (7, 5, {"tie": 1, "bad_image": 1})
    agree = [w == o for w, o in zip(want[:2], [1, 0])]
    assert summary["agreement_with_source_label"] == pytest.approx(sum(agree) / 2)
    assert "`clip`" in (pairs / "README.md").read_text() and "Near-ties: kept" in (pairs / "README.md").read_text()
    assert Image.open(pairs / "plots" / "reward_distributions.png").format == "PNG"
    assert len(card_images_uploaded(pairs / "README.md")) == 3
    ds = datasets.load_dataset("parquet", data_files=str(pairs / "part-*.parquet"), split="train")
    assert ds.num_rows == 5 and set(ds["label_0"]) <= {0, 1}

    # `richpref card` writes the same card and plots again, in the run's folder wherever it was moved to;
    # before, it wrote the edit pipeline's card (jpg_1 "its edit", a flip rate, an edit_mask column)
    card, plot = (pairs / "README.md").read_bytes(), (pairs / "plots" / "flip_rate.png").read_bytes()
    moved = tmp_path / "moved"
    out.rename(moved)
    assert main(["--data-dir", str(moved), "card", "relabel"]) == 0
    assert (moved / "runs/relabel/pairs/README.md").read_bytes() == card
    assert (moved / "runs/relabel/pairs/plots/flip_rate.png").read_bytes() == plot
    assert not (moved / "runs/relabel/plots").exists() and not out.exists()
    summary_file = moved / "runs/relabel/relabel.json"
    kept = summary_file.read_bytes()
    summary_file.unlink()  # a run stopped before its end: one line naming the fix (before: a traceback)
    assert main(["--data-dir", str(moved), "card", "relabel"]) == 2
    summary_file.write_bytes(kept)
    out = moved
    from richpref.views.inspect import format_summary, summary as run_summary

    # no flip rate: jpg_1 is no edit of jpg_0 (before, the summary said "edit scored lower than the original")
    text = format_summary(run_summary(str(out), "relabel"))
    assert "flip rate" not in text and f"agreement with the source label: {sum(agree) / 2:.1%}" in text

    from richpref.views.report import build_report  # the pairs, each with the source's label beside the new one

    page = build_report(str(out), "relabel")
    changed = 2 - sum(agree)  # the tie contradicts no label; the second file has no label_0
    assert f"5 exported pairs, {changed} with a label other than the source&#x27;s" in page
    assert page.count('data-flipped="true"') == changed
    assert all(f'alt="{p}"' in page for p in ("reward_distributions.png", "flip_rate.png", "margin_histogram.png"))  # before: none
    assert sorted(re.findall(r"source label_0 [\d.]+: \w+", page)) == sorted(
        [f"source label_0 {o}: {'changed' if w != o else 'kept'}" for w, o in zip(want[:2], [1, 0])] + ["source label_0 0.5: tie"])


def test_relabel_dataset_refuses_cutout_rewards_and_item_groups(tiny_models, tmp_path):
    from richpref.recipes.relabel_dataset import DatasetError, relabel_dataset

    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [solid(1, 2)], "jpg_1": [solid(3, 4)]}), tmp_path / "a.parquet")
    profile = load_profile("tiny", models_root=str(tiny_models))
    on_cut = load_profile("tiny", ["score.rewards.clip.on_cutout=true"], models_root=str(tiny_models))
    with pytest.raises(DatasetError, match="cut-outs"):
        relabel_dataset(str(tmp_path / "a.parquet"), str(tmp_path / "out"), on_cut, reward="clip")
    with pytest.raises(DatasetError, match="standardize=shard"):
        relabel_dataset(str(tmp_path / "a.parquet"), str(tmp_path / "out"),
                        load_profile("tiny", ["relabel.standardize=item"], models_root=str(tiny_models)))
    with pytest.raises(DatasetError, match="not in the profile"):
        relabel_dataset(str(tmp_path / "a.parquet"), str(tmp_path / "out"), profile, reward="mps")
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(DatasetError, match="caption, jpg_0, jpg_1"):
        relabel_dataset(str(tmp_path / "b.parquet"), str(tmp_path / "out"), profile, reward="clip")
    # no rows: before, a run of 0 pairs with a card and plots of nothing, reported as done
    pq.write_table(pa.table({"caption": pa.array([], pa.string()), "jpg_0": pa.array([], pa.binary()),
                             "jpg_1": pa.array([], pa.binary())}), tmp_path / "empty.parquet")
    with pytest.raises(DatasetError, match=rf"^'{tmp_path}/empty.parquet' has no rows in its 1 Parquet file\(s\): "
                                           "nothing to relabel"):
        relabel_dataset(str(tmp_path / "empty.parquet"), str(tmp_path / "out"), profile, reward="clip")
    assert not (tmp_path / "out").exists()
    # a run's folder: before, its first stage table was named as lacking Pick-a-Pic columns
    run = tmp_path / "runs" / "demo"
    for stage in ("check", "pairs"):
        (run / stage).mkdir(parents=True)
        pq.write_table(pa.table({"prompt": ["x"]}), run / stage / "part-00000.parquet")
    (run / "run.json").write_text("{}")
    with pytest.raises(DatasetError, match=rf"^'{run}' is a run's folder: give its pairs, '{run}/pairs'$"):
        relabel_dataset(str(run), str(tmp_path / "out"), profile, reward="clip")


def test_a_run_of_another_pipeline_is_not_overwritten(tiny_models, tmp_path, capsys):
    # before, `--run demo` on a curate run replaced its source and relabel shards with the dataset's, and
    # with them the keys of every later stage (a curate of it again would redo all the GPU work)
    from richpref.cli.commands import main
    from richpref.recipes.inline import run_inline
    from richpref.schemas.config import ProfileError

    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [solid(1, 2)], "jpg_1": [solid(3, 4)]}), tmp_path / "a.parquet")
    run = tmp_path / "data" / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "profile.json").write_text(json.dumps({"name": "tiny", "source": {"kind": "prompts"}}))  # an edit run, as saved
    message = (f"run 'demo' at {run} holds the edit pipeline's shards (profile 'tiny'); a relabel_dataset profile "
               "would replace them: give another --run")
    assert main(["relabel-dataset", str(tmp_path / "a.parquet"), str(tmp_path / "data"), "--run", "demo",
                 "--models-root", str(tiny_models), "--reward", "clip"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert main(["--data-dir", str(tmp_path / "data"), "curate", "--profile", "tiny-rebuild", "--run", "demo",
                 "--models-root", str(tiny_models), "--plan"]) == 2
    assert "a rebuild profile would replace them" in capsys.readouterr().err
    with pytest.raises(ProfileError, match="a rebuild profile would replace them"):  # the flows' own check
        run_inline(load_profile("tiny-rebuild", models_root=str(tiny_models)), str(tmp_path / "data"), "demo")
    assert sorted(p.name for p in run.iterdir()) == ["profile.json"]  # nothing written


def test_a_relabelled_richpref_export_keeps_its_columns_but_flipped_follows_the_new_label():
    from richpref.tasks.pickapic_relabel import export_pairs

    # a richpref export relabelled: both labels reversed by the reward. Before, `flipped` stayed the
    # source's and contradicted the new label_0 (1 = jpg_0, the original, preferred = a flipped pair)
    source = pa.table({"caption": ["a", "b"], "jpg_0": [b"0", b"2"], "jpg_1": [b"1", b"3"], "label_0": [1, 0],
                       "item_id": ["x", "y"], "flipped": [True, False], "editor": ["e", "e"]})
    decided = pa.table({"item_id": ["x", "y"], "chosen": pa.array([1, 0], pa.int8()), "flipped": [False, True],
                        "margin": [0.5, 0.25], "clip_0": [0.1, 0.9]})
    got = export_pairs(decided, source).to_pydict()
    assert got["label_0"] == [0, 1] and got["label_0_source"] == [1.0, 0.0]
    assert got["flipped"] == [False, True] and got["editor"] == ["e", "e"] and got["margin"] == [0.5, 0.25]
    assert [json.loads(j) for j in got["scores"]] == [{"clip_0": 0.1}, {"clip_0": 0.9}]


def test_relabel_dataset_follows_the_reward_and_drops_near_ties_only_when_asked():
    from richpref.recipes.relabel_dataset import dataset_relabel_config

    score = ScoreConfig(rewards={"ir": RewardModel(kind="clip", model="-"), "clip": RewardModel(kind="clip", model="-")},
                        subject_gate=SubjectGateConfig(model="-"))
    cfg = RelabelConfig(weights={"ir": 1.0}, min_margin=0.3, min_consistency=0.5)
    one_score, one = dataset_relabel_config(score, cfg, "clip")  # a reward without a vote picked by --reward is the one vote
    assert one_score.scored() == ["clip"] and one.voting(one_score.scored()) == ["clip"] and one.weight("clip") == 1.0
    assert one.min_margin == 0.0 and one_score.subject_gate is None  # the reward's order; nothing was edited
    assert dataset_relabel_config(score, cfg, "clip", drop_near_ties=True)[1].min_margin == 0.3


def test_relabel_dataset_resumes_only_the_missing_shards_and_counts_every_row(tiny_models, tmp_path, monkeypatch):
    from richpref.common.faults import InjectedFault
    from richpref.recipes.relabel_dataset import relabel_dataset
    from richpref.run.plan import plan_run
    from richpref.run.storage import RunStore
    from richpref.views.inspect import status, summary as run_summary

    rng = np.random.default_rng(7)
    a = [_jpeg(_image(rng)) for _ in range(5)]
    b = [_jpeg(_image(rng)) for _ in range(5)]
    b[1] = a[1]  # a tie
    pq.write_table(pa.table({"caption": [f"prompt {k}" for k in range(5)], "jpg_0": a, "jpg_1": b,
                             "label_0": [1.0, 0.0, 1.0, 0.0, 1.0]}), tmp_path / "src.parquet")
    profile = load_profile("tiny", models_root=str(tiny_models))
    out, store = tmp_path / "out", RunStore(str(tmp_path / "out"), "relabel")

    def work() -> list[tuple[str, int]]:
        return sorted((r["stage"], r["shard"]) for r in store.read_log("work.jsonl"))

    monkeypatch.setenv("RICHPREF_FAULTS", "pickapic_score:1:raise")  # the run stops in the score stage's shard 1
    with pytest.raises(InjectedFault):
        relabel_dataset(str(tmp_path / "src.parquet"), str(out), profile, reward="clip", rows_per_shard=2)
    assert work() == [("pickapic_score", 0), ("pickapic_source", 0), ("pickapic_source", 1), ("pickapic_source", 2)]
    monkeypatch.delenv("RICHPREF_FAULTS")
    run_profile = profile.model_validate_json((out / "runs" / "relabel" / "profile.json").read_text())
    plan = {p.stage: (p.done, p.todo, p.blocked) for p in plan_run(run_profile, str(out), "relabel").stages}
    assert plan["pickapic_source"] == ([0, 1, 2], [], []) and plan["pickapic_score"] == ([0], [1, 2], [])

    before = len(work())
    summary = relabel_dataset(str(tmp_path / "src.parquet"), str(out), profile, reward="clip", rows_per_shard=2)
    redone = sorted((r["stage"], r["shard"]) for r in store.read_log("work.jsonl")[before:])
    assert redone == [("pickapic_export", s) for s in range(3)] + [("pickapic_relabel", s) for s in range(3)] + \
        [("pickapic_score", 1), ("pickapic_score", 2)]
    assert (summary["rows"], summary["kept"], summary["rejected"]) == (5, 4, {"tie": 1})
    assert summary["shards"] == 3 and all(s["done"] == 3 and not s["missing"] for s in status(str(out), "relabel")["stages"])
    views = run_summary(str(out), "relabel")["stages"]  # the inspect views of a curate run, pairs_full too
    assert [(v["stage"], v["rows"], v["kept"]) for v in views] == [("source", 5, 5), ("score", 5, 5), ("relabel", 5, 4),
                                                                   ("pairs", 4, 4)]

    # A committed pairs shard whose manifest is gone is the only shard computed again.
    (out / "runs" / "relabel" / "pairs" / "part-00001.manifest.json").unlink()
    before = len(work())
    again = relabel_dataset(str(tmp_path / "src.parquet"), str(out), profile, reward="clip", rows_per_shard=2)
    assert [(r["stage"], r["shard"]) for r in store.read_log("work.jsonl")[before:]] == [("pickapic_export", 1)]
    assert {k: again[k] for k in ("rows", "kept", "rejected")} == {k: summary[k] for k in ("rows", "kept", "rejected")}


def test_relabel_dataset_refuses_a_reward_model_that_is_not_there_before_any_shard(tmp_path, capsys):
    from richpref.cli.commands import main

    rng = np.random.default_rng(1)
    src = tmp_path / "src.parquet"
    pq.write_table(pa.table({"caption": ["a cat"], "jpg_0": [_jpeg(_image(rng))], "jpg_1": [_jpeg(_image(rng))],
                             "label_0": [1.0]}), src)
    out = tmp_path / "out"
    rc = main(["relabel-dataset", str(src), str(out), "--profile", "tiny", "--reward", "imagereward",
               "--models-root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert rc == 3 and "pickapic_score: model 'imagereward' cannot be loaded" in err, err
    assert str(tmp_path / "nowhere" / "imagereward") in err and "Traceback" not in err
    assert not (out / "runs" / "relabel" / "source").exists()


def test_a_pair_without_a_caption_stops_at_the_source_and_only_shards_that_may_hold_one_are_keyed_anew(
        tiny_models, tmp_path):
    # before, it was kept, scored against "" and exported with a null caption (diffusers' DPO script fails on it)
    from richpref.recipes.relabel_dataset import relabel_dataset
    from richpref.sources.parquet import ParquetPart
    from richpref.tasks.pickapic_source import may_hold_blank_captions

    rng = np.random.default_rng(3)
    captions = ["prompt 0", "prompt 1", None, " \t", "prompt 4"]
    table = pa.table({"caption": captions, "jpg_0": [_jpeg(_image(rng)) for _ in range(5)],
                      "jpg_1": [_jpeg(_image(rng)) for _ in range(5)], "label_0": [1.0, 0.0, 1.0, 0.0, 1.0]})
    pq.write_table(table, tmp_path / "src.parquet", row_group_size=2)  # row groups = shards of 2 rows
    part = ParquetPart(str(tmp_path / "src.parquet"))
    # the footer tells: shard 1 may hold one (a null, or a smallest value that starts with whitespace)
    assert [may_hold_blank_captions(part, a, a + 2) for a in (0, 2, 4)] == [False, True, False]
    pq.write_table(table.slice(3, 1), tmp_path / "blank.parquet")  # " \t" alone: no null, its smallest value is blank
    pq.write_table(table.slice(0, 2), tmp_path / "plain.parquet", write_statistics=False)  # nothing to tell by
    assert may_hold_blank_captions(ParquetPart(str(tmp_path / "blank.parquet")), 0, 1)
    assert may_hold_blank_captions(ParquetPart(str(tmp_path / "plain.parquet")), 0, 2)

    summary = relabel_dataset(str(tmp_path / "src.parquet"), str(tmp_path / "out"), load_profile("tiny", models_root=str(
        tiny_models)), reward="clip", rows_per_shard=2)
    assert (summary["rows"], summary["kept"], summary["rejected"]) == (5, 3, {"bad_prompt": 2})
    source = pq.read_table(tmp_path / "out" / "runs" / "relabel" / "source" / "part-00001.parquet")
    assert source.column("reason").to_pylist() == ["bad_prompt: missing", "bad_prompt: empty"]
