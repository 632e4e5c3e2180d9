"""The questions of the reward-head judges (HPSv3, EditReward): richpref's default wording, a user's
template file in its place (what the model then sees: tests/models/test_judges_head.py), checked before any
model loads, and part of the score stage's key."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from richpref.prompts import REWARD_TOKEN, load_head_template
from richpref.schemas.config import RewardSpec, ScoreConfig
from richpref.schemas.rewards import REWARD_KINDS
from richpref.tasks.relabel_score import TEMPLATE_OPTIONS, templates_key

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
