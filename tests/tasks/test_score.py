"""The score stage (richpref/tasks/score.py): the reward models' raw scores, nothing decided.
Bad images are rejected with a reason, a non-finite score is recorded (and rejects the pair in relabel
when its reward votes or gates), every reward of `score.rewards` and only those are loaded, and a
reward (or the subject gate) with `on_cutout` scores the cut-outs. The head judges' questions: the
default wording, a user's template file, checked before any model loads, and part of the stage's key."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from relabel_helpers import ChannelValue, solid
from richpref.prompts import REWARD_TOKEN, load_head_template
from richpref.schemas.config import RelabelConfig, RewardModel, RewardSpec, ScoreConfig
from richpref.schemas.rewards import REWARD_KINDS
from richpref.tasks.score import TEMPLATE_OPTIONS, templates_key
from richpref.tasks import relabel as relabel_stage


def test_bad_images_and_non_finite_scores_are_rejected_with_a_reason():
    class NaNOnBlue:
        model_id = "nan"

        def score(self, images, prompts, *, batch_size=8):
            return np.array([np.nan if np.asarray(im)[..., 2].mean() > 0 else 1.0 for im in images])

    score = ScoreConfig(rewards={"red": RewardModel(kind="clip", model="-"), "nanny": RewardModel(kind="clip", model="-")})
    images = {"original": [solid(1, 0), b"not an image", solid(5, 0), solid(7, 0), solid(4, 0, 9)],
              "edited": [solid(2, 0), solid(3, 0), solid(6, 0, 9), solid(9, 0), solid(8, 0)]}
    out = relabel_stage.relabel_rows(["a", "b", "c", "d", "e"], ["p"] * 5, images, score, RelabelConfig(),
                                     {"red": ChannelValue(0), "nanny": NaNOnBlue()}.__getitem__).to_pylist()
    assert [r["status"] for r in out] == ["ok", "rejected", "rejected", "ok", "rejected"]
    assert out[1]["reason"].startswith("bad_image:") and out[2]["reason"] == "bad_score: non-finite nanny score"
    assert out[4]["reason"] == "bad_score: non-finite nanny score"  # the original's score too

    # every candidate edit of an item whose original cannot be decoded, and an edit that cannot be, rejected
    images = {"original": [b"not an image", b"not an image", solid(1, 0)], "edited": [solid(2, 0), solid(3, 0), b""]}
    out = relabel_stage.relabel_rows(["a", "a", "b"], ["p"] * 3, images, score, RelabelConfig(),
                                     {"red": ChannelValue(0), "nanny": ChannelValue(0)}.__getitem__,
                                     candidates=[0, 1, 0]).to_pylist()
    assert [(r["item_id"], r["status"], r["reason"][:32]) for r in out] == [
        ("a", "rejected", "bad_image: cannot decode (Uniden"), ("a", "rejected", "bad_image: cannot decode (Uniden"),
        ("b", "rejected", "bad_image: empty image bytes")]


class Mute:
    """A generative judge whose answers on images with any blue hold no score (NaN, raw answer in `unparsed`)."""

    model_id = "mute"

    def score(self, images, prompts, *, batch_size=8):
        blue = [np.asarray(im)[..., 2].mean() > 0 for im in images]
        self.unparsed = {k: "I cannot say" for k, b in enumerate(blue) if b}
        return np.array([np.nan if b else float(np.asarray(im)[..., 1].mean()) for b, im in zip(blue, images)])


def test_a_report_only_reward_without_a_score_reports_it_and_decides_nothing():
    from richpref.views.datacard import score_stats
    from richpref.tasks.export import scores_json
    from richpref.tasks.score import score_rows

    images = {"original": [solid(1, 0), solid(5, 0), solid(7, 3)], "edited": [solid(2, 0), solid(6, 0, 9), solid(9, 1)]}
    score = ScoreConfig(rewards={"red": RewardModel(kind="clip", model="-"),
                                 "mute": RewardModel(kind="unified_reward", model="-")})
    scorers = {"red": ChannelValue(0), "mute": Mute()}.__getitem__
    reported = RelabelConfig(weights={"red": 1.0})
    scores = score_rows(["a", "b", "c"], ["p"] * 3, images, score, scorers).to_pylist()
    assert [r["status"] for r in scores] == ["ok", "ok", "ok"]
    assert np.isnan(scores[1]["mute_1"]) and scores[1]["unscored"] == "mute answered 'I cannot say'"
    assert scores[0]["unscored"] is None and scores[2]["mute_1"] == 1
    table = relabel_stage.decide_rows(relabel_stage.score_rows(["a", "b", "c"], ["p"] * 3, images, score, scorers),
                                      score, reported)
    out = table.to_pylist()
    stats = score_stats(table)["rewards"]["mute"]  # the card: over the rows it scored
    assert stats["side_1"]["max"] == 1 and stats["side_1_lower"] == 0.5
    assert [(r["status"], r["chosen"]) for r in out] == [("ok", 1), ("ok", 1), ("ok", 1)]  # red alone decides
    assert np.isnan(out[1]["mute_z1"]) and all(np.isfinite(r["composite_1"]) and np.isfinite(r["mute_z0"]) for r in out)
    assert out[2]["mute_z1"] != 0  # z over the scored images only
    exported = json.loads(scores_json(out[1], ["mute_1", "mute_z1", "red_1"]),
                          parse_constant=lambda c: pytest.fail(f"{c} in the exported scores"))  # strict JSON
    assert exported["mute_1"] is None and exported["mute_z1"] is None and exported["red_1"] == 6
    # The same reward voting rejects (in relabel) the row it cannot score, with the raw answer.
    voting = relabel_stage.decide_rows(relabel_stage.score_rows(["a", "b", "c"], ["p"] * 3, images, score, scorers),
                                       score, RelabelConfig()).to_pylist()
    assert [r["status"] for r in voting] == ["ok", "rejected", "ok"]
    assert voting[1]["reason"] == "unparsed_answer: mute answered 'I cannot say'"


def test_a_report_only_edit_judge_that_gates_still_rejects_what_it_cannot_score():
    from richpref.tasks.score import score_rows

    class NoScore:
        model_id, pairwise = "no-score", True

        def score_pairs(self, originals, edits, prompts, *, batch_size=8):
            return np.array([[1.0, np.nan if np.asarray(b)[..., 2].mean() > 0 else 2.0] for b in edits])

    score = ScoreConfig(rewards={"red": RewardModel(kind="clip", model="-"),
                                 "judge": RewardModel(kind="edit_reward", model="-")})
    images = {"original": [solid(1, 0), solid(5, 0)], "edited": [solid(2, 0), solid(6, 0, 9)], "instruction": ["x", "y"]}
    scores = score_rows(["a", "b"], ["p"] * 2, images, score, {"red": ChannelValue(0), "judge": NoScore()}.__getitem__)
    assert scores.column("status").to_pylist() == ["ok", "ok"]  # the score stage decides nothing
    gated = RelabelConfig(weights={"red": 1.0}, edit_gate={"reward": "judge", "min_score": 0.0})
    out = relabel_stage.decide_rows(scores, score, gated).to_pylist()
    assert [r["status"] for r in out] == ["ok", "rejected"]
    assert out[1]["reason"] == "bad_score: non-finite judge score"
    reported = RelabelConfig(weights={"red": 1.0})
    assert relabel_stage.decide_rows(scores, score, reported).column("status").to_pylist() == ["ok", "ok"]


def test_only_the_rewards_of_score_are_loaded_and_only_weighted_ones_vote():
    images = {"original": [solid(10, 5), solid(20, 10)], "edited": [solid(30, 0), solid(20, 30)]}
    red = {"red": RewardModel(kind="clip", model="-")}
    only_red = {"red": ChannelValue(0)}  # asking for green would raise KeyError
    out = relabel_stage.relabel_rows(["a", "b"], ["p"] * 2, images, ScoreConfig(rewards=red), RelabelConfig(),
                                     only_red.__getitem__)
    assert "green_0" not in out.schema.names and out.column("status").to_pylist() == ["ok", "rejected"]
    both = ScoreConfig(rewards={**red, "green": RewardModel(kind="clip", model="-")})
    out = relabel_stage.relabel_rows(["a", "b"], ["p"] * 2, images, both, RelabelConfig(weights={"red": 1.0}),
                                     {**only_red, "green": ChannelValue(1)}.__getitem__)
    a = out.to_pylist()[0]
    assert (a["green_0"], a["green_1"]) == (5, 0) and a["chosen"] == 1  # green fell, red rose: red alone votes


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


# The head judges' questions: default wording, a user's template, checked before any model loads, in the score key

# The default prompts of the judges with a head, by option (their declarations, richpref/schemas/rewards/).
HEAD_JUDGE_PROMPTS = {k: {o: REWARD_KINDS[k].defaults[o] for o in TEMPLATE_OPTIONS if o in REWARD_KINDS[k].defaults}
                      for k in ("hpsv3", "edit_reward")}


def key(**rewards) -> str:
    class P:
        score = ScoreConfig(rewards=rewards)

    return templates_key(P)


def test_judge_options_are_checked_by_the_profile(tmp_path):
    RewardSpec(kind="hpsv3", model="MizzenAI/HPSv3", backbone="Qwen/Qwen2-VL-7B-Instruct", file="HPSv3.safetensors")
    with pytest.raises(ValidationError, match="reward kind 'edit_reward' takes no max_new_tokens"):
        RewardSpec(kind="edit_reward", model="x", max_new_tokens=4)
    with pytest.raises(ValidationError, match="reward kind 'hpsv3' takes no quality_template"):
        RewardSpec(kind="hpsv3", model="x", quality_template="edit_reward_quality_v1")
    with pytest.raises(ValidationError, match=r"template file '.*missing.txt' not found"):
        RewardSpec(kind="hpsv3", model="x", template=str(tmp_path / "missing.txt"))
    (tmp_path / "no_token.txt").write_text("Rate it: {prompt}")
    with pytest.raises(ValidationError, match=r"needs the field \{prompt\}.*<\|Reward\|> once"):
        RewardSpec(kind="edit_reward", model="x", quality_template=str(tmp_path / "no_token.txt"))
    (tmp_path / "caption.txt").write_text("Rate it: {caption} <|Reward|>")
    with pytest.raises(ValidationError, match=r"fields \['caption'\]"):
        RewardSpec(kind="hpsv3", model="x", template=str(tmp_path / "caption.txt"))


def test_the_default_templates_are_fit_for_the_heads():
    for defaults in HEAD_JUDGE_PROMPTS.values():
        for name in defaults.values():
            text = load_head_template(name)
            assert text.rstrip().endswith(REWARD_TOKEN), name  # the score is read at the prompt's end


def test_the_judges_prompt_texts_are_part_of_the_score_key(tmp_path):
    assert HEAD_JUDGE_PROMPTS == {"hpsv3": {"template": "hpsv3_v1"},
                                  "edit_reward": {"template": "edit_reward_following_v1",
                                                  "quality_template": "edit_reward_quality_v1"}}
    base = key(h=RewardSpec(kind="hpsv3", model="-"), e=RewardSpec(kind="edit_reward", model="-"))
    assert all(f"{t}=" in base for t in ("hpsv3_v1", "edit_reward_following_v1", "edit_reward_quality_v1"))
    own = tmp_path / "q.txt"
    own.write_text("Is it clean? {prompt} <|Reward|>")
    with_own = key(h=RewardSpec(kind="hpsv3", model="-"), e=RewardSpec(kind="edit_reward", model="-", quality_template=str(own)))
    assert "edit_reward_quality_v1=" not in with_own and f"{own}=" in with_own
    own.write_text("Is it clean? Say so. {prompt} <|Reward|>")  # the text, not only the path, is keyed
    assert key(h=RewardSpec(kind="hpsv3", model="-"), e=RewardSpec(kind="edit_reward", model="-", quality_template=str(own))) != with_own
