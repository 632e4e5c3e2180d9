"""The relabel stage (richpref/tasks/relabel.py): from the score stage's raw scores to one labelled
pair per item, no model call. Composite, flip, tie and pairing rules by hand, the subject gate, the
relabel config's rules, and the stage on every tiny reward of the mini run."""
from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from relabel_helpers import N_ITEMS, ChannelValue, solid
from richpref.schemas.config import Profile, RelabelConfig, RewardModel, ScoreConfig, SubjectGateConfig
from richpref.tasks import relabel as relabel_stage


# ------------------------------------------------------------------ composite, flip, tie and pairing: by hand

def relabel(ids, prompts, images, cfgs: tuple[ScoreConfig, RelabelConfig], get_scorer, **kw):
    """relabel_rows with the (score, relabel) sections of a test."""
    return relabel_stage.relabel_rows(ids, prompts, images, *cfgs, get_scorer, **kw)


def with_(cfgs: tuple[ScoreConfig, RelabelConfig], **update) -> tuple[ScoreConfig, RelabelConfig]:
    return cfgs[0], cfgs[1].model_copy(update=update)


def clip(*names: str) -> ScoreConfig:
    return ScoreConfig(rewards={n: RewardModel(kind="clip", model="-") for n in names})


def hand_config(standardize="shard", min_margin=0.0):
    return clip("red", "green"), RelabelConfig(weights={"red": 1.0, "green": 2.0}, standardize=standardize,
                                               min_margin=min_margin)


# item a: red 10 -> 30, green 0 -> 10; item b: red 20 -> 20, green 10 -> 0
HAND_IMAGES = {"original": [solid(10, 0), solid(20, 10)], "edited": [solid(30, 10), solid(20, 0)]}
SCORERS = {"red": ChannelValue(0), "green": ChannelValue(1)}


def test_zscore_by_hand():
    from richpref.models.rewards import zscore

    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0, 4.0])), np.array([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25))
    np.testing.assert_allclose(zscore(np.array([1.0, 3.0, 5.0, 5.0]), np.array([0, 0, 1, 1])), [-1, 1, 0, 0])


def test_shard_standardised_weighted_composite_flip_and_margin_by_hand():
    out = relabel(["a", "b"], ["p", "q"], HAND_IMAGES, hand_config("shard"), SCORERS.__getitem__).to_pylist()
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
    out = relabel(["a", "b"], ["p", "q"], HAND_IMAGES, hand_config("item", min_margin=4.5),
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


RED = clip("red"), RelabelConfig(standardize="item")


def several_edits(pairing: str, standardize: str = "item"):
    """Item a: original red 10, edits 30 / 20 / 0; item b: original 40, edits 30 / 10."""
    ids, cands = ["a", "a", "a", "b", "b"], [0, 1, 2, 0, 1]
    images = {"original": [solid(10, 0)] * 3 + [solid(40, 0)] * 2,
              "edited": [solid(30, 0), solid(20, 0), solid(0, 0), solid(30, 0), solid(10, 0)]}
    cfg = with_(RED, pairing=pairing, standardize=standardize)
    return relabel(ids, ["p"] * 5, images, cfg, {"red": ChannelValue(0)}.__getitem__,
                                      candidates=cands).to_pylist()


def test_item_standardisation_keeps_the_size_of_a_gap_with_one_edit_per_item():
    """A per-item spread would make every one-edit item a +-1 vote: gaps of 1e-4 and 20 alike."""
    images = {"original": [solid(10, 0), solid(100, 0), solid(50, 0)], "edited": [solid(30, 0), solid(100, 0, 1), solid(60, 0)]}

    class Tiny(ChannelValue):
        def score(self, images, prompts, *, batch_size=8):
            s = super().score(images, prompts)
            return s + np.array([1e-4 if np.asarray(im)[..., 2].mean() else 0 for im in images])

    out = relabel(["a", "b", "c"], ["p"] * 3, images, RED, {"red": Tiny(0)}.__getitem__).to_pylist()
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


def test_the_pair_chosen_from_an_items_composites_by_hand():
    choose = relabel_stage.choose_pair
    composites = {-1: 0.5, 0: 0.2, 1: 0.9, 2: 0.9}  # -1 is the original; edits 1 and 2 tie: the lower wins
    assert choose(composites, "best_vs_original") == (-1, 1)
    assert choose(composites, "best_vs_worst") == (0, 1)
    assert choose({-1: 0.9, 0: 0.2, 1: 0.5}, "best_vs_worst") == (-1, 0)  # the original best: it is jpg_0
    # every image scored the same: the best edit (the lowest) against the original, which the stage calls a tie
    assert choose({-1: 0.3, 0: 0.3, 1: 0.3}, "best_vs_worst") == (-1, 0)


def test_shard_standardisation_counts_each_original_once_by_hand():
    a0, *_rest, b0, b1 = several_edits("best_vs_original", standardize="shard")
    # the shard's 7 images: originals [10, 40], edits [30, 20, 0, 30, 10]: mean 20, std √(1200/7)
    s = math.sqrt(1200 / 7)
    assert a0["composite_0"] == pytest.approx(-10 / s) and a0["composite_1"] == pytest.approx(10 / s)
    assert b1["composite_0"] == pytest.approx(20 / s) and b1["composite_1"] == pytest.approx(-10 / s)


def test_one_edit_per_item_gives_the_same_pairs_under_both_pairings():
    a = relabel(["a", "b"], ["p", "q"], HAND_IMAGES, hand_config("shard"), SCORERS.__getitem__).to_pylist()
    b = relabel(["a", "b"], ["p", "q"], HAND_IMAGES,
                                   with_(hand_config("shard"), pairing="best_vs_worst"),
                                   SCORERS.__getitem__).to_pylist()
    assert a == b


class BatchNoise:
    """The red channel, times 1 + 1e-7 * (place in the batch): how batched float32 scores the same image
    slightly differently on some processors."""

    model_id = "batch-noise"

    def score(self, images, prompts, *, batch_size=8):
        return np.array([np.asarray(im, dtype=np.float64)[..., 0].mean() * (1 + 1e-7 * k) for k, im in enumerate(images)])


def test_identical_images_and_margins_within_float_noise_are_ties_on_any_processor():
    cfg = clip("red"), RelabelConfig(min_margin=0.0)
    images = {"original": [solid(10, 0), solid(50, 0), solid(60, 0, 0), solid(40, 0)],
              "edited": [solid(30, 0), solid(50, 0), solid(60, 0, 1), solid(20, 0)]}
    out = relabel(["a", "same", "near", "b"], ["p"] * 4, images, cfg,
                                     {"red": BatchNoise()}.__getitem__).to_pylist()
    a, same, near, b = out
    assert same["margin"] > 0 and near["margin"] > 0  # the noise alone separates them
    assert same["status"] == "rejected" and same["reason"] == "tie: the two images are the same bytes"
    assert near["status"] == "rejected" and near["reason"].startswith("tie: composite margin")
    assert (a["status"], a["chosen"], b["status"], b["chosen"]) == ("ok", 1, "ok", 0)


def test_a_reward_scored_in_bfloat16_makes_ties_of_margins_within_its_rounding():
    # red over the shard: [10, 100, 40, 30, 101, 20], spread s; "near" has margin 1/s. The tie tolerance is
    # 2 rho max|x| / s: float32 (rho 2^-15) 0.006/s keeps it, bfloat16 (rho 2^-5) 6.3/s makes it a tie;
    # a and b (margins 20/s) are pairs either way.
    class Half(ChannelValue):
        dtype = "bfloat16"  # what the score stage records for it (a served head reports its dtype so)

    images = {"original": [solid(10, 0), solid(100, 0), solid(40, 0)], "edited": [solid(30, 0), solid(101, 0), solid(20, 0)]}
    cfg = clip("red"), RelabelConfig(min_margin=0.0)
    for scorer, near_status in ((ChannelValue(0), "ok"), (Half(0), "rejected")):
        a, near, b = relabel(["a", "near", "b"], ["p"] * 3, images, cfg, {"red": scorer}.__getitem__).to_pylist()
        assert (a["status"], near["status"], b["status"]) == ("ok", near_status, "ok"), near["reason"]
    assert near["reason"].startswith("tie: composite margin") and "float noise" in near["reason"]


def test_the_tie_tolerance_is_twice_the_noise_of_one_composite_by_hand():
    # A margin is the difference of two composites, each moved by up to `noise`: 2 * noise. bfloat16 (rho
    # 2^-5), red over the shard [10, 100, 50, 40, 30, 108, 56, 20], spread s: noise = 108 / 32 / s, so
    # the tolerance is 6.75/s: "8" (margin 8/s) is a pair, "6" (6/s) a tie (3 * noise would make both ties).
    class Half(ChannelValue):
        dtype = "bfloat16"

    images = {"original": [solid(10, 0), solid(100, 0), solid(50, 0), solid(40, 0)],
              "edited": [solid(30, 0), solid(108, 0), solid(56, 0), solid(20, 0)]}
    out = relabel(["a", "8", "6", "b"], ["p"] * 4, images, (clip("red"), RelabelConfig(min_margin=0.0)),
                  {"red": Half(0)}.__getitem__).to_pylist()
    spread = float(np.std([10, 100, 50, 40, 30, 108, 56, 20]))
    assert out[1]["margin"] == pytest.approx(8 / spread) and out[2]["margin"] == pytest.approx(6 / spread)
    assert [r["status"] for r in out] == ["ok", "ok", "rejected", "ok"]
    assert out[2]["reason"].endswith(f"float noise {2 * 108 / 32 / spread:.2g}")


def test_float_noise_of_a_z_score_by_hand():
    from richpref.tasks.pairing import relative_noise, standardise, z_noise

    z, spread = standardise(np.array([1.0, 2, 3, 4]))
    assert spread == pytest.approx(math.sqrt(1.25))
    assert z_noise(np.array([1.0, 2, 3, 4]), spread, 1e-3) == pytest.approx(4e-3 / math.sqrt(1.25))  # rho max|x| / spread
    assert z_noise(np.array([7.0, 7.0]), standardise(np.array([7.0, 7.0]))[1], 1e-3) == 0  # no spread: z is exactly 0
    assert relative_noise("float32") == 2 ** -15 and relative_noise("torch.float16") == 2 ** -8
    assert relative_noise("bfloat16") == 2 ** -5 and relative_noise("float64") == 2 ** -15  # 4 ulps; unknown: float32


def test_a_reward_with_no_score_is_left_out_of_the_standardisation_by_hand():
    """NaN (a report-only reward that scored nothing) takes no part: the rest are standardised as if it
    were not there, over all of them or around their group's mean, and it stays NaN."""
    from richpref.tasks.pairing import standardise

    values = np.array([1.0, np.nan, 3, 5, 9])
    z, spread = standardise(values, np.array([0, 0, 0, 1, 1]))  # finite groups: {1, 3} around 2, {5, 9} around 7
    assert spread == pytest.approx(math.sqrt(2.5))
    np.testing.assert_allclose(z, np.array([-1, np.nan, 1, -2, 2]) / math.sqrt(2.5))
    z, spread = standardise(values)  # around 4.5
    assert spread == pytest.approx(math.sqrt(8.75))
    np.testing.assert_allclose(z, np.array([-3.5, np.nan, -1.5, 0.5, 4.5]) / math.sqrt(8.75))


def test_a_16_bit_reward_is_recorded_in_its_dtype_so_its_ties_widen(tiny_models):
    """The dtype the score stage records per reward (`scorer_dtype`) sets the tie noise relabel allows it:
    a head in bfloat16, a VLM scorer by its model's dtype; a scorer that names none is float32."""
    from richpref.models.rewards import load_reward
    from richpref.tasks.pairing import scorer_dtype

    clip = load_reward("clip", str(tiny_models / "clip"), device="cpu", dtype="bfloat16")
    vlm = load_reward("vlm_score", str(tiny_models / "qwen2.5-vl"), device="cpu", dtype="bfloat16")
    assert (scorer_dtype(clip), scorer_dtype(vlm), scorer_dtype(ChannelValue(0))) == ("bfloat16", "bfloat16", "float32")
    assert not hasattr(vlm, "dtype")  # found through its model, as a VLM scorer is


# ------------------------------------------------------------------ the subject gate and the config's rules

class Consistency:
    """A pair scorer: 1 - |red difference| / 255 for the edit, 1 for the original."""

    model_id, pairwise = "red-consistency", True

    def score_pairs(self, originals, edits, prompts, *, batch_size=8):
        red = lambda im: np.asarray(im, dtype=np.float64)[..., 0].mean()  # noqa: E731
        return np.array([[1.0, 1 - abs(red(a) - red(b)) / 255] for a, b in zip(originals, edits)])


def test_the_subject_gate_rejects_edits_that_changed_too_much_and_never_votes():
    gate = SubjectGateConfig(model="-", on_cutout=False)
    cfg = clip("green").model_copy(update={"subject_gate": gate}), RelabelConfig(min_consistency=0.9)
    # a: red 10 -> 20 (consistency 0.96), green up; b: red 10 -> 200 (0.25), green up; c: red 50 -> 50, green down
    images = {"original": [solid(10, 10), solid(10, 10), solid(50, 40)], "edited": [solid(20, 30), solid(200, 30), solid(50, 0)]}
    scorers = {"green": ChannelValue(1), "subject_consistency": Consistency()}
    a, b, c = relabel(["a", "b", "c"], ["p"] * 3, images, cfg, scorers.__getitem__).to_pylist()
    assert b["status"] == "rejected" and b["reason"].startswith("subject_changed: DINOv2 patch consistency 0.2")
    assert (a["status"], a["chosen"], c["status"], c["chosen"]) == ("ok", 1, "ok", 0)
    # the consistency is recorded, not combined: the composite is green's z alone (over a's and c's images)
    assert a["subject_consistency"] == pytest.approx(1 - 10 / 255)
    z = (np.array([10.0, 30, 40, 0]) - 20) / np.std([10.0, 30, 40, 0])
    assert (a["composite_0"], a["composite_1"]) == (pytest.approx(z[0]), pytest.approx(z[1]))
    # a consistency at the threshold passes (untested before; found by a mutation sweep)
    at = cfg[0], RelabelConfig(min_consistency=a["subject_consistency"])
    assert relabel(["a"], ["p"], {k: v[:1] for k, v in images.items()}, at, scorers.__getitem__).to_pylist()[0]["status"] == "ok"


def test_relabel_config_rules():
    """What relabel decides must name what score measures (checked where the two sections meet, the Profile)."""
    with pytest.raises(ValidationError, match="subject_gate"):
        ScoreConfig(rewards={"dino": RewardModel(kind="dino_patch", model="-")})

    def profile(**relabel):
        return Profile(name="p", score=clip("clip", "pick"), relabel=RelabelConfig(**relabel))

    with pytest.raises(ValidationError, match="not in score.rewards"):
        profile(weights={"clip": 1.0, "hps": 1.0})
    with pytest.raises(ValidationError, match="weight 0"):
        profile(weights={"clip": 0.0})
    with pytest.raises(ValidationError, match="not a scored edit judge"):
        profile(edit_gate={"reward": "clip", "min_score": 0.0})
    with pytest.raises(ValidationError, match="score.subject_gate"):
        profile(min_consistency=0.5)
    assert profile(weights={"pick": 2.0}).relabel.voting(["clip", "pick"]) == ["pick"]  # clip: recorded only
    assert RelabelConfig().voting(["clip", "pick"]) == ["clip", "pick"]  # unset: every reward, weight 1
    default = Profile(name="p")
    assert default.relabel.voting(default.score.scored()) == ["imagereward"]
    assert default.score.dtype == "float32"  # as RPO and the reference scorer


# ------------------------------------------------------------------ the mini run: every tiny reward, combined

def test_relabel_stage_scores_every_tiny_reward_and_combines_them(mini_run):
    from richpref.models.rewards import zscore

    _, store, profile = mini_run
    scores = store.read_shard("relabel", 0).to_pylist()
    assert [r["item_id"] for r in scores] == [f"item{k}" for k in range(N_ITEMS) if k != 2]  # the filter's reject is not here
    names = profile.score.scored()
    assert len(names) == 8 and profile.relabel.voting(names) == ["imagereward"]  # as RPO; the others report only
    for r in scores:
        assert 0 < r["subject_consistency"] < 1.0  # the gate's measure, not a reward
        assert 0 <= r["vlm_score_0"] <= 1 and 0 < r["hp_1"] < 1
    # the composite, recomputed from the stored raw scores: per-reward z over the shard's 2N values, weighted sum
    c0 = np.zeros(len(scores))
    c1 = np.zeros(len(scores))
    for n in names:
        z = zscore(np.array([r[f"{n}_0"] for r in scores] + [r[f"{n}_1"] for r in scores]))
        w = profile.relabel.weight(n)
        c0 += w * z[: len(scores)]
        c1 += w * z[len(scores):]
    np.testing.assert_allclose([r["composite_0"] for r in scores], c0, atol=1e-9)
    np.testing.assert_allclose([r["composite_1"] for r in scores], c1, atol=1e-9)
    for r, a, b in zip(scores, c0, c1):
        assert r["status"] == "ok" and r["chosen"] == int(b > a) and r["flipped"] == (b <= a)
        assert r["chosen"] == int(r["imagereward_1"] > r["imagereward_0"])  # ImageReward alone decides
