"""Composite, flip and tie rules by hand; the relabel stage on every tiny reward; the Pick-a-Pic export
read exactly as the Diffusion-DPO training scripts read it; the dataset card and plots; relabelling an
existing Pick-a-Pic dataset from the command line."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from richpref.images import encode_png
from richpref.schemas.config import RelabelConfig, RewardSpec, load_profile
from richpref.schemas.tables import CHECKS, CRITIQUES, CUTOUTS, EDITS, INSTRUCTIONS, PROMPTS, SAMPLES, VERDICTS, rows_to_table
from richpref.storage import RunStore
from richpref.tasks import export as export_stage
from richpref.tasks import relabel as relabel_stage
from richpref.runner import content_key, run_shard, write_shard
from richpref.tasks import relabel_score as score_stage


# ------------------------------------------------------------------ composite, flip, tie: by hand

class ChannelValue:
    """A deterministic reward: the mean of one colour channel (solid test images make it exact)."""

    def __init__(self, channel: int) -> None:
        self.channel, self.model_id = channel, f"channel-{channel}"

    def score(self, images, prompts, *, batch_size=8):
        return np.array([np.asarray(im, dtype=np.float64)[..., self.channel].mean() for im in images])


def solid(r, g, b=0):
    return encode_png(Image.new("RGB", (16, 16), (r, g, b)))


def hand_config(standardize="shard", min_margin=0.0):
    return RelabelConfig(rewards={"red": RewardSpec(kind="clip", model="-", weight=1.0),
                                  "green": RewardSpec(kind="clip", model="-", weight=2.0)},
                         standardize=standardize, min_margin=min_margin)


# item a: red 10 -> 30, green 0 -> 10; item b: red 20 -> 20, green 10 -> 0
HAND_IMAGES = {"original": [solid(10, 0), solid(20, 10)], "edited": [solid(30, 10), solid(20, 0)]}
SCORERS = {"red": ChannelValue(0), "green": ChannelValue(1)}


def test_zscore_by_hand():
    from richpref.models.rewards import zscore

    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0, 4.0])), np.array([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25))
    np.testing.assert_allclose(zscore(np.array([1.0, 3.0, 5.0, 5.0]), np.array([0, 0, 1, 1])), [-1, 1, 0, 0])


def test_shard_standardised_weighted_composite_flip_and_margin_by_hand():
    out = relabel_stage.relabel_rows(["a", "b"], ["p", "q"], HAND_IMAGES, hand_config("shard"), SCORERS.__getitem__).to_pylist()
    # red over the shard: [10, 30, 20, 20] -> mean 20, std sqrt(50): z = [-√2, √2, 0, 0]
    # green over the shard: [0, 10, 10, 0] -> mean 5, std 5: z = [-1, 1, 1, -1]; weight 2
    r2 = math.sqrt(2)
    a, b = out
    assert a["red_z0"] == pytest.approx(-r2) and a["red_z1"] == pytest.approx(r2) and b["red_z0"] == pytest.approx(0)
    assert a["composite_0"] == pytest.approx(-r2 - 2) and a["composite_1"] == pytest.approx(r2 + 2)
    assert b["composite_0"] == pytest.approx(2) and b["composite_1"] == pytest.approx(-2)
    assert (a["status"], a["chosen"], a["flipped"], a["margin"]) == ("ok", 1, False, pytest.approx(2 * r2 + 4))
    assert (b["status"], b["chosen"], b["flipped"], b["margin"]) == ("ok", 0, True, pytest.approx(4))


def test_item_standardisation_and_ties_by_hand():
    out = relabel_stage.relabel_rows(["a", "b"], ["p", "q"], HAND_IMAGES, hand_config("item", min_margin=4.5),
                                     SCORERS.__getitem__).to_pylist()
    a, b = out
    # centred per item, scaled by the shard's spread around the item means:
    # red a [10, 30] -> [-10, 10], b [20, 20] -> [0, 0]; spread √50: z a [-√2, √2], b [0, 0]
    # green a [0, 10] -> [-5, 5], b [10, 0] -> [5, -5]; spread 5: z a [-1, 1], b [1, -1]; weight 2
    r2 = math.sqrt(2)
    assert (a["composite_0"], a["composite_1"], a["margin"]) == (pytest.approx(-r2 - 2), pytest.approx(r2 + 2),
                                                                 pytest.approx(2 * r2 + 4))
    assert a["status"] == "ok" and a["chosen"] == 1
    assert b["margin"] == pytest.approx(4) and b["status"] == "rejected" and b["reason"].startswith("tie:")
    assert b["chosen"] is None  # a tie has no label: it can never be exported as 0.5


RED = RelabelConfig(rewards={"red": RewardSpec(kind="clip", model="-", weight=1.0)}, standardize="item")


def several_edits(pairing: str, standardize: str = "item"):
    """Item a: original red 10, edits 30 / 20 / 0; item b: original 40, edits 30 / 10."""
    ids, cands = ["a", "a", "a", "b", "b"], [0, 1, 2, 0, 1]
    images = {"original": [solid(10, 0)] * 3 + [solid(40, 0)] * 2,
              "edited": [solid(30, 0), solid(20, 0), solid(0, 0), solid(30, 0), solid(10, 0)]}
    cfg = RED.model_copy(update={"pairing": pairing, "standardize": standardize})
    return relabel_stage.relabel_rows(ids, ["p"] * 5, images, cfg, {"red": ChannelValue(0)}.__getitem__,
                                      candidates=cands).to_pylist()


def test_item_standardisation_keeps_the_size_of_a_gap_with_one_edit_per_item():
    """A per-item spread would make every one-edit item a +-1 vote: gaps of 1e-4 and 20 alike."""
    images = {"original": [solid(10, 0), solid(100, 0), solid(50, 0)], "edited": [solid(30, 0), solid(100, 0, 1), solid(60, 0)]}

    class Tiny(ChannelValue):
        def score(self, images, prompts, *, batch_size=8):
            s = super().score(images, prompts)
            return s + np.array([1e-4 if np.asarray(im)[..., 2].mean() else 0 for im in images])

    out = relabel_stage.relabel_rows(["a", "b", "c"], ["p"] * 3, images, RED, {"red": Tiny(0)}.__getitem__).to_pylist()
    # deviations from the item means: a ±10, b ±5e-5, c ±5; spread √((200 + 50 + 5e-9) / 6)
    spread = math.sqrt((200 + 50 + 5e-9) / 6)
    assert out[0]["margin"] == pytest.approx(20 / spread) and out[2]["margin"] == pytest.approx(10 / spread)
    assert out[1]["margin"] == pytest.approx(1e-4 / spread)


def test_best_edit_against_the_original_by_hand():
    a0, a1, a2, b0, b1 = several_edits("best_vs_original")
    # item a [10, 30, 20, 0] around its mean 15: [-5, 15, 5, -15]; b [40, 30, 10] around 80/3: [40/3, 10/3, -50/3]
    s = math.sqrt((25 + 225 + 25 + 225 + (1600 + 100 + 2500) / 9) / 7)
    assert (a0["status"], a0["candidate_0"], a0["candidate_1"], a0["chosen"], a0["flipped"]) == ("ok", -1, 0, 1, False)
    assert (a0["composite_0"], a0["composite_1"], a0["margin"]) == (pytest.approx(-5 / s), pytest.approx(15 / s),
                                                                    pytest.approx(20 / s))
    for r, c, z in ((a1, 1, 5 / s), (a2, 2, -15 / s)):  # the others: rejected, with their own comparison kept
        assert r["status"] == "rejected" and r["reason"].startswith("not_selected:") and r["chosen"] is None
        assert (r["candidate_0"], r["candidate_1"], r["composite_1"]) == (-1, c, pytest.approx(z))
    # item b [40, 30, 10]: the best edit (30) still loses to the original: a flipped pair
    assert (b0["status"], b0["candidate_1"], b0["chosen"], b0["flipped"]) == ("ok", 0, 0, True)
    assert b1["reason"].startswith("not_selected:")


def test_best_against_worst_by_hand():
    a0, a1, a2, b0, b1 = several_edits("best_vs_worst")
    s = math.sqrt((25 + 225 + 25 + 225 + (1600 + 100 + 2500) / 9) / 7)
    # item a: best edit 0 (30), worst edit 2 (0): the pair is (edit 0, edit 2), carried by edit 2's row
    assert (a2["status"], a2["candidate_0"], a2["candidate_1"], a2["chosen"], a2["flipped"]) == ("ok", 0, 2, 0, False)
    assert (a2["red_0"], a2["red_1"], a2["margin"]) == (30, 0, pytest.approx(30 / s))
    assert a0["status"] == "rejected" and a0["reason"].startswith("not_selected: jpg_0 of candidate 2's pair")
    assert a1["status"] == "rejected" and a1["reason"].startswith("not_selected:")
    # item b: the original is best (40) and edit 1 worst (10): original is jpg_0, the pair flipped
    assert (b1["status"], b1["candidate_0"], b1["candidate_1"], b1["chosen"], b1["flipped"]) == ("ok", -1, 1, 0, True)
    assert b0["reason"].startswith("not_selected:")


def test_shard_standardisation_counts_each_original_once_by_hand():
    a0, *_rest, b0, b1 = several_edits("best_vs_original", standardize="shard")
    # the shard's 7 images: originals [10, 40], edits [30, 20, 0, 30, 10]: mean 20, std √(1200/7)
    s = math.sqrt(1200 / 7)
    assert a0["composite_0"] == pytest.approx(-10 / s) and a0["composite_1"] == pytest.approx(10 / s)
    assert b1["composite_0"] == pytest.approx(20 / s) and b1["composite_1"] == pytest.approx(-10 / s)


def test_one_edit_per_item_gives_the_same_pairs_under_both_pairings():
    a = relabel_stage.relabel_rows(["a", "b"], ["p", "q"], HAND_IMAGES, hand_config("shard"), SCORERS.__getitem__).to_pylist()
    b = relabel_stage.relabel_rows(["a", "b"], ["p", "q"], HAND_IMAGES,
                                   hand_config("shard").model_copy(update={"pairing": "best_vs_worst"}),
                                   SCORERS.__getitem__).to_pylist()
    assert a == b


def test_bad_images_and_non_finite_scores_are_rejected_with_a_reason():
    class NaNOnBlue:
        model_id = "nan"

        def score(self, images, prompts, *, batch_size=8):
            return np.array([np.nan if np.asarray(im)[..., 2].mean() > 0 else 1.0 for im in images])

    cfg = RelabelConfig(rewards={"red": RewardSpec(kind="clip", model="-"), "nanny": RewardSpec(kind="clip", model="-")})
    images = {"original": [solid(1, 0), b"not an image", solid(5, 0), solid(7, 0)],
              "edited": [solid(2, 0), solid(3, 0), solid(6, 0, 9), solid(9, 0)]}
    out = relabel_stage.relabel_rows(["a", "b", "c", "d"], ["p"] * 4, images, cfg,
                                     {"red": ChannelValue(0), "nanny": NaNOnBlue()}.__getitem__).to_pylist()
    assert [r["status"] for r in out] == ["ok", "rejected", "rejected", "ok"]
    assert out[1]["reason"].startswith("bad_image:") and out[2]["reason"] == "bad_score: non-finite nanny score"


class BatchNoise:
    """The red channel, times 1 + 1e-7 * (place in the batch): how batched float32 scores the same image
    slightly differently on some processors."""

    model_id = "batch-noise"

    def score(self, images, prompts, *, batch_size=8):
        return np.array([np.asarray(im, dtype=np.float64)[..., 0].mean() * (1 + 1e-7 * k) for k, im in enumerate(images)])


def test_identical_images_and_margins_within_float_noise_are_ties_on_any_processor():
    cfg = RelabelConfig(rewards={"red": RewardSpec(kind="clip", model="-")}, min_margin=0.0)
    images = {"original": [solid(10, 0), solid(50, 0), solid(60, 0, 0), solid(40, 0)],
              "edited": [solid(30, 0), solid(50, 0), solid(60, 0, 1), solid(20, 0)]}
    out = relabel_stage.relabel_rows(["a", "same", "near", "b"], ["p"] * 4, images, cfg,
                                     {"red": BatchNoise()}.__getitem__).to_pylist()
    a, same, near, b = out
    assert same["margin"] > 0 and near["margin"] > 0  # the noise alone separates them
    assert same["status"] == "rejected" and same["reason"] == "tie: the two images are the same bytes"
    assert near["status"] == "rejected" and near["reason"].startswith("tie: composite margin")
    assert (a["status"], a["chosen"], b["status"], b["chosen"]) == ("ok", 1, "ok", 0)


def test_float_noise_of_a_z_score_by_hand():
    from richpref.pairing import relative_noise, standardise, z_noise

    z, spread = standardise(np.array([1.0, 2, 3, 4]))
    assert spread == pytest.approx(math.sqrt(1.25))
    assert z_noise(np.array([1.0, 2, 3, 4]), spread, 1e-3) == pytest.approx(4e-3 / math.sqrt(1.25))  # rho max|x| / spread
    assert z_noise(np.array([7.0, 7.0]), standardise(np.array([7.0, 7.0]))[1], 1e-3) == 0  # no spread: z is exactly 0
    assert relative_noise("float32") == 2 ** -15 and relative_noise("torch.float16") == 2 ** -8


# ------------------------------------------------------------------ a mini run: relabel + export through the real stages

N_ITEMS = 6
PROMPT_TEXT = ["a red bicycle", "three green apples", "a cat in a box", "an astronaut on a horse", "a blue teapot", "a lighthouse"]


def _image(rng, size=64):
    base = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
    return Image.fromarray(np.clip(base + rng.integers(0, 60, (size, size, 3)), 0, 255).astype(np.uint8))


def write_upstream(store: RunStore) -> dict:
    """Shard 0 of every stage before the reward scores, with one item dropped by the filter."""
    rng = np.random.default_rng(11)
    ids = [f"item{k}" for k in range(N_ITEMS)]
    originals = [_image(rng) for _ in ids]
    edits = [Image.fromarray(np.clip(np.asarray(o, dtype=int) + rng.integers(-50, 50, (64, 64, 3)), 0, 255).astype(np.uint8))
             for o in originals]
    cut = lambda im: encode_png(Image.fromarray(np.where(np.arange(64)[None, :, None] < 32, np.asarray(im), 255).astype(np.uint8)))  # noqa: E731
    ok = {"status": "ok", "reason": None}
    tables = {
        "source": rows_to_table([{"item_id": i, **ok, "source": "test", "source_row": k, "prompt": PROMPT_TEXT[k]}
                                 for k, i in enumerate(ids)], PROMPTS),
        "sample": rows_to_table([{"item_id": i, **ok, "prompt": PROMPT_TEXT[k], "image": encode_png(originals[k]), "width": 64,
                                  "height": 64, "seed": k, "origin": "generated", "model_id": "sd15"} for k, i in enumerate(ids)], SAMPLES),
        "critique": rows_to_table([{"item_id": i, **ok, "prompt": PROMPT_TEXT[k], "critique": f"critique {k}", "model_id": "critic"}
                                   for k, i in enumerate(ids)], CRITIQUES),
        "instruct": rows_to_table([{"item_id": i, **ok, "prompt": PROMPT_TEXT[k], "instructions": [f"fix {k}"], "model_id": "vlm"}
                                   for k, i in enumerate(ids)], INSTRUCTIONS),
        "edit": rows_to_table([{"item_id": i, **ok, "candidate": 0, "edit_prompt": f"{PROMPT_TEXT[k]}, fix {k}", "image": encode_png(edits[k]),
                                "width": 64, "height": 64, "seed": k, "model_id": "editor"} for k, i in enumerate(ids)], EDITS),
        "cutout": rows_to_table([{"item_id": i, **ok, "candidate": 0, "original_cutout": cut(originals[k]), "edited_cutout": cut(edits[k]),
                                  "model_id": "u2net"} for k, i in enumerate(ids)], CUTOUTS),
        "check": rows_to_table([{"item_id": i, **ok, "candidate": 0} for i in ids], CHECKS),
        "filter": rows_to_table([{"item_id": i, "candidate": 0, "status": "rejected" if k == 2 else "ok",
                                  "reason": "filter: not_executed(p_yes=0.10 < 0.5)" if k == 2 else None,
                                  "verdict": "drop" if k == 2 else "keep"} for k, i in enumerate(ids)], VERDICTS),
    }
    return {name: write_shard(store, name, 0, t, key=f"test-{name}") for name, t in tables.items()}


def run_stage(stage, store, profile, manifests):
    inputs = {r: manifests[r] for r in stage.reads}
    manifests[stage.out] = run_shard(stage, 0, inputs, store, profile, content_key(stage, profile, 0, inputs))


@pytest.fixture(scope="module")
def mini_run(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("runs")
    store = RunStore(str(data), "mini")
    profile = load_profile("tiny", models_root=str(tiny_models))
    store.write_text("profile.json", profile.model_dump_json(indent=2))
    manifests = write_upstream(store)
    run_stage(score_stage.STAGE, store, profile, manifests)
    run_stage(relabel_stage.STAGE, store, profile, manifests)
    run_stage(export_stage.STAGE, store, profile, manifests)
    return data, store, profile


def test_relabel_stage_scores_every_tiny_reward_and_combines_them(mini_run):
    from richpref.models.rewards import zscore

    _, store, profile = mini_run
    scores = store.read_shard("relabel", 0).to_pylist()
    assert [r["item_id"] for r in scores] == [f"item{k}" for k in range(N_ITEMS) if k != 2]  # the filter's reject is not here
    names = profile.relabel.scored()
    assert len(names) == 8 and profile.relabel.voting() == ["imagereward"]  # as RPO; the others report only
    for r in scores:
        assert 0 < r["subject_consistency"] < 1.0  # the gate's measure, not a reward
        assert 0 <= r["vlm_score_0"] <= 1 and 0 < r["hp_1"] < 1
    # the composite, recomputed from the stored raw scores: per-reward z over the shard's 2N values, weighted sum
    c0 = np.zeros(len(scores))
    c1 = np.zeros(len(scores))
    for n in names:
        z = zscore(np.array([r[f"{n}_0"] for r in scores] + [r[f"{n}_1"] for r in scores]))
        w = profile.relabel.rewards[n].weight
        c0 += w * z[: len(scores)]
        c1 += w * z[len(scores):]
    np.testing.assert_allclose([r["composite_0"] for r in scores], c0, atol=1e-9)
    np.testing.assert_allclose([r["composite_1"] for r in scores], c1, atol=1e-9)
    for r, a, b in zip(scores, c0, c1):
        assert r["status"] == "ok" and r["chosen"] == int(b > a) and r["flipped"] == (b <= a)
        assert r["chosen"] == int(r["imagereward_1"] > r["imagereward_0"])  # ImageReward alone decides


def test_relabel_uses_the_cutouts_when_a_reward_says_so(mini_run, tiny_models):
    from richpref.models.rewards import load_reward

    _, store, _ = mini_run
    row = store.read_shard("relabel", 0).to_pylist()[0]
    cut = store.read_shard("cutout", 0).to_pylist()[0]
    full = store.read_shard("sample", 0).to_pylist()[0], store.read_shard("edit", 0).to_pylist()[0]
    dino = load_reward("dino_patch", str(tiny_models / "dinov2"), patch=28, stride=14, device="cpu")
    on_cut = dino.score_pairs([Image.open(io.BytesIO(cut["original_cutout"]))], [Image.open(io.BytesIO(cut["edited_cutout"]))], ["x"])
    on_full = dino.score_pairs([Image.open(io.BytesIO(full[0]["image"]))], [Image.open(io.BytesIO(full[1]["image"]))], ["x"])
    assert row["subject_consistency"] == pytest.approx(on_cut[0, 1], abs=1e-9)
    assert row["subject_consistency"] != pytest.approx(on_full[0, 1], abs=1e-6)


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
        scores = json.loads(train[k]["scores"])
        assert scores["imagereward_0"] == relabel[iid]["imagereward_0"] and "hp_z1" in scores and "subject_consistency" in scores


def test_dataset_card_and_plots(mini_run, capsys):
    from richpref.cli import main

    data, store, profile = mini_run
    assert main(["--data-dir", str(data), "card", "mini"]) == 0
    written = json.loads(capsys.readouterr().out)
    card = open(written["README.md"], encoding="utf-8").read()
    assert written["README.md"].endswith("mini/pairs/README.md")
    assert card.startswith("---\nconfigs:") and 'path: "part-*.parquet"' in card
    relabel = store.read_shard("relabel", 0).to_pylist()
    assert f"flip rate (of the pairs holding the original: the edit scored lower, label_0 = 1): {_flip_rate(relabel):.1%}" in card
    assert "| filter | 6 | 5 | 1 | filter: 1 |" in card  # counts with the reject reason
    for name in profile.relabel.scored():
        a = np.array([r[f"{name}_0"] for r in relabel])
        title = f"{name} (HPSv2 v2.0)" if name == "hpsv2" else name  # the version is named wherever HPSv2 shows
        assert f"| {title} | {profile.relabel.rewards[name].weight:g} | {a.mean():.4g} ± {a.std():.3g}" in card
    assert '"min_margin": 0.0' in card  # the config is in the card
    for png in ("reward_distributions.png", "flip_rate.png", "margin_histogram.png"):
        im = Image.open(written[png])
        assert im.format == "PNG" and im.width > 100
        assert f"../plots/{png}" in card
    # the card and plots do not disturb readers of the pairs folder
    assert len(store.shards("pairs")) == 1


def _flip_rate(relabel_rows: list[dict]) -> float:
    """The product's flip rate: of the kept pairs that hold the original (candidate_0 = −1), the share
    where the edit scored lower. Ties and other rejects are not pairs; pairs of two edits cannot flip."""
    with_original = [r for r in relabel_rows if r["status"] == "ok" and r.get("candidate_0") in (None, -1)]
    return sum(bool(r["flipped"]) for r in with_original) / len(with_original)


# ------------------------------------------------------------------ relabel an existing Pick-a-Pic dataset

def _jpeg(im):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_relabel_dataset_cli_rewrites_label_0_and_drops_ties(tiny_models, tmp_path):
    import datasets

    from richpref.cli import main
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

    first = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert [r["ranking_id"] for r in first] == [10, 11, 12]  # tie (13) and broken (14) dropped, other columns kept
    assert [r["label_0"] for r in first] == want
    assert [r["label_0_source"] for r in first] == [1.0, 0.0, 0.5]
    assert all(r["jpg_0"] == a[k] and r["jpg_1"] == b[k] for k, r in enumerate(first))  # bytes untouched
    second = pq.read_table(out / "part-00001.parquet")
    assert second.schema.field("jpg_0").type == pa.binary()  # structs become raw bytes, as the trainers read them
    assert second.column("label_0").to_pylist() == want[:2]  # standardised per shard: the order within a pair is what counts

    summary = json.loads((out / "relabel.json").read_text())
    assert (summary["rows"], summary["kept"], summary["rejected"]) == (7, 5, {"tie": 1, "bad_image": 1})
    agree = [w == o for w, o in zip(want[:2], [1, 0])]
    assert summary["agreement_with_source_label"] == pytest.approx(sum(agree) / 2)
    assert "`clip`" in (out / "README.md").read_text() and "Near-ties: kept" in (out / "README.md").read_text()
    assert Image.open(out / "plots" / "reward_distributions.png").format == "PNG"
    ds = datasets.load_dataset("parquet", data_files=str(out / "part-*.parquet"), split="train")
    assert ds.num_rows == 5 and set(ds["label_0"]) <= {0, 1}


def test_relabel_dataset_refuses_cutout_rewards_and_item_groups(tiny_models, tmp_path):
    from richpref.relabel_dataset import DatasetError, relabel_dataset

    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [solid(1, 2)], "jpg_1": [solid(3, 4)]}), tmp_path / "a.parquet")
    profile = load_profile("tiny", models_root=str(tiny_models))
    on_cut = load_profile("tiny", ["relabel.rewards.clip.on_cutout=true"], models_root=str(tiny_models))
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
