"""The export stage (richpref/tasks/export.py): the pairs in Pick-a-Pic format read exactly as the
Diffusion-DPO training scripts read them, and the dataset card and plots beside them. The flip rate
on a run with ties: tests/scenarios/test_flip_rate.py."""
from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from relabel_helpers import _flip_rate


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
        assert f"../plots/{png}" in card
    # the card and plots do not disturb readers of the pairs folder
    assert len(store.shards("pairs")) == 1
