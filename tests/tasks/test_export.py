"""The export stage (richpref/tasks/export.py): the pairs in Pick-a-Pic format read exactly as the
Diffusion-DPO training scripts read them, and the dataset card and plots beside them. The flip rate
on a run with ties: tests/scenarios/test_flip_rate.py."""
from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from relabel_helpers import _flip_rate, card_images_uploaded


def test_export_is_read_unmodified_like_the_diffusion_dpo_training_scripts(mini_run):
    """The data path of diffusers' train_diffusion_dpo.py (and SalesforceAIResearch/DiffusionDPO),
    transcribed: load_dataset('parquet'), decode jpg_0/jpg_1 with Image.open(io.BytesIO(x)), resize jpg_1 to
    jpg_0's size, stack the pair chosen-first (`if label_0 == 0: swap`), tokenize `caption`."""
    import datasets
    from torchvision import transforms

    _, store, _ = mini_run
    ds = datasets.load_dataset("parquet", data_files=str(store.stage_dir("pairs")) + "/*.parquet")
    train = ds["train"]
    assert {"caption", "jpg_0", "jpg_1", "label_0"} <= set(train.column_names)
    assert set(train["label_0"]) <= {0, 1}
    tf = transforms.Compose([transforms.Resize(64), transforms.CenterCrop(64), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def preprocess_train(examples):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in examples["jpg_0"]]
        sizes = [(im.height, im.width) for im in images]
        all_pixels = []
        for col in ("jpg_0", "jpg_1"):
            ims = [Image.open(io.BytesIO(b)).convert("RGB") for b in examples[col]]
            if col == "jpg_1":
                ims = [im.resize(sizes[i][::-1]) for i, im in enumerate(ims)]
            all_pixels.append([tf(im) for im in ims])
        combined = []
        for pair, label_0 in zip(zip(*all_pixels), examples["label_0"]):
            if label_0 == 0:
                pair = pair[::-1]
            combined.append(torch.cat(pair, dim=0))
        examples["pixel_values"] = combined
        examples["captions"] = [c for c in examples["caption"]]
        return examples

    batch = train.with_transform(preprocess_train)[: train.num_rows]
    relabel = {r["item_id"]: r for r in store.read_shard("relabel", 0).to_pylist()}
    samples = {r["item_id"]: r for r in store.read_shard("sample", 0).to_pylist()}
    edits = {r["item_id"]: r for r in store.read_shard("edit", 0).to_pylist()}
    assert train.num_rows == sum(r["status"] == "ok" for r in relabel.values())
    for k, iid in enumerate(train["item_id"]):
        chosen = samples[iid]["image"] if relabel[iid]["chosen"] == 0 else edits[iid]["image"]
        first = batch["pixel_values"][k][:3]
        assert torch.equal(first, tf(Image.open(io.BytesIO(chosen)).convert("RGB")))  # the preferred image comes first
        assert batch["captions"][k] == samples[iid]["prompt"]
        pair = [Image.open(io.BytesIO(train[k][c])) for c in ("jpg_0", "jpg_1", "edit_mask")]
        assert pair[0].size == pair[1].size == pair[2].size and pair[0].format == pair[1].format == "PNG"
        assert pair[2].mode == "L" and set(np.unique(np.asarray(pair[2]))) <= {0, 255}
        scores = json.loads(train[k]["scores"])
        assert scores["imagereward_0"] == relabel[iid]["imagereward_0"] and "hp_z1" in scores and "subject_consistency" in scores


def test_dataset_card_and_plots(mini_run, capsys):
    from richpref.cli.commands import main

    data, store, profile = mini_run
    assert main(["--data-dir", str(data), "card", "mini"]) == 0
    written = json.loads(capsys.readouterr().out)
    card = open(written["README.md"], encoding="utf-8").read()
    assert written["README.md"].endswith("mini/pairs/README.md")
    assert card.startswith("---\nconfigs:") and 'path: "part-*.parquet"' in card
    relabel = store.read_shard("relabel", 0).to_pylist()
    assert f"flip rate (of the pairs holding the original: the edit scored lower, label_0 = 1): {_flip_rate(relabel):.1%}" in card
    assert "| filter | 6 | 5 | 1 | filter: 1 |" in card  # counts with the reject reason
    for name in profile.score.scored():
        a = np.array([r[f"{name}_0"] for r in relabel])
        title = f"{name} (HPSv2 v2.0)" if name == "hpsv2" else name  # the version is named wherever HPSv2 shows
        assert f"| {title} | {profile.relabel.weight(name):g} | {a.mean():.4g} ± {a.std():.3g}" in card
    assert '"min_margin": 0.0' in card  # the config is in the card
    assert f"Profile: `tiny`: {profile.description.strip()}" in card  # which profile, and what it adds
    assert "Sampling: `sample.safety_checker: false`" in card
    assert "both PNG (lossless) (`export.image_format: png`)" in card and "`edit_mask`: PNG, mode L" in card
    for png in ("reward_distributions.png", "flip_rate.png", "margin_histogram.png"):
        im = Image.open(written[png])
        assert im.format == "PNG" and im.width > 100
        assert f"plots/{png}" in card
    # every image of the card lies beside it and is uploaded with it (before, ../plots: none on the Hub)
    assert len(card_images_uploaded(written["README.md"])) == 3
    # the card and plots do not disturb readers of the pairs folder
    assert len(store.shards("pairs")) == 1


def test_each_relabelled_row_becomes_one_pair_with_its_winner_side_and_provenance():
    """By hand, three relabel rows: an edit that beat its original (label_0 = 0), an original that beat
    its edit (a flipped pair, label_0 = 1) and two edits of one item (jpg_0 the lower-numbered edit);
    every other column carried from its stage, the extra reward columns as strict JSON."""
    import pyarrow as pa
    import pytest

    from richpref.tasks.export import export_rows

    from image_helpers import encoded

    orig, e0, e1 = (encoded(Image.new("RGB", (8, 8), c)) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200)))
    scores = pa.table({"item_id": ["a", "b", "c"], "status": ["ok"] * 3, "chosen": [1, 0, 1],
                       "flipped": [False, True, False], "margin": [0.5, 0.25, 0.125],
                       "candidate_0": [-1, -1, 0], "candidate_1": [0, 0, 1],
                       "hps_0": [0.1, 0.9, 0.3], "hps_1": [0.2, float("nan"), 0.4]})
    samples = pa.table({"prompt": ["pa", "pb", "pc"], "image": [orig] * 3, "model_id": ["sd", "sd", "sd"]})
    edits = pa.table({"image": [e0, e0, e1], "edit_prompt": ["ea", "eb", "ec1"], "model_id": ["ed"] * 3,
                      "editor": ["controlnet"] * 3})
    side0 = pa.table({"image": [None, None, e0]}, schema=pa.schema([("image", pa.binary())]))
    critiques = pa.table({"critique": ["ca", "cb", "cc"], "model_id": ["critic"] * 3})
    instructions = pa.table({"instructions": [["ia"], ["ib"], ["ic"]], "model_id": ["qwen"] * 3})
    sources = pa.table({"source": ["s"] * 3})
    rows = export_rows(scores, samples, edits, critiques, instructions, sources, "cfg", side0_edits=side0).to_pylist()

    assert [(r["item_id"], r["caption"], r["label_0"], r["candidate_0"], r["candidate_1"], r["flipped"], r["margin"])
            for r in rows] == [("a", "pa", 0, -1, 0, False, 0.5), ("b", "pb", 1, -1, 0, True, 0.25),
                               ("c", "pc", 0, 0, 1, False, 0.125)]
    assert [(r["jpg_0"], r["jpg_1"]) for r in rows] == [(orig, e0), (orig, e0), (e0, e1)]  # PNG in, PNG out
    assert [(r["critique"], r["instructions"], r["edit_prompt"], r["source"], r["editor"], r["config_hash"])
            for r in rows][2] == ("cc", ["ic"], "ec1", "s", "controlnet", "cfg")
    assert json.loads(rows[1]["scores"]) == {"hps_0": 0.9, "hps_1": None}  # NaN -> null
    assert json.loads(rows[0]["model_ids"]) == {"sample": "sd", "critique": "critic", "instruct": "qwen", "edit": "ed"}

    bad = scores.set_column(2, "chosen", pa.array([1, 2, 1]))
    with pytest.raises(ValueError, match="relabel row b has chosen=2; expected 0 or 1"):
        export_rows(bad, samples, edits, critiques, instructions, sources, "cfg", side0_edits=side0)
