"""Profiles of the previous layout (richpref/schemas/migrate.py): the check stage's settings under
`filter:` still load for one release, in a YAML, in an `extends:` chain and as `filter.key=value`
overrides; each move is named in one warning per load."""
from __future__ import annotations

import warnings

import pytest

from richpref.schemas.config import CheckConfig, FilterConfig, Profile, ProfileError, load_profile
from richpref.schemas.migrate import ProfileMigrationWarning

OLD = """name: old
extends: tiny
filter:
  model: qwen2.5-vl
  max_new_tokens: 24
  batch_size: 8
  engine: {backend: server, launch: vllm}
  min_executed: 0.4
"""


def loaded(path, overrides=()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        profile = load_profile(str(path), list(overrides))
    moved = [w for w in caught if issubclass(w.category, ProfileMigrationWarning)]
    return profile, [str(w.message) for w in moved]


def test_an_old_yaml_loads_with_one_warning_naming_every_move(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(OLD)
    profile, [message] = loaded(path)
    assert message.startswith(f"profile {path} uses keys of the previous layout (filter.model is now check.model")
    assert profile.check.model == "qwen2.5-vl" and profile.check.engine.launch == "vllm"
    assert (profile.check.max_new_tokens, profile.check.batch_size, profile.filter.min_executed) == (24, 8, 0.4)
    for key in ("model", "max_new_tokens", "batch_size", "engine"):
        assert f"filter.{key} is now check.{key}" in message
    assert "min_executed" not in message and "next release refuses" in message
    # as before: the file's filter: replaced the base's whole section (the check's settings with it)
    assert profile.filter == FilterConfig(min_executed=0.4)
    assert profile.check == CheckConfig(model="qwen2.5-vl", max_new_tokens=24, batch_size=8,
                                        engine={"backend": "server", "launch": "vllm"})


def test_an_old_override_moves_and_wins_over_the_yaml(tmp_path):
    profile, [message] = loaded("tiny", ["filter.max_new_tokens=12", "filter.engine.backend=server",
                                         "filter.engine.launch=vllm"])
    assert (profile.check.max_new_tokens, profile.check.engine.launch) == (12, "vllm")
    # the old keys are the command's, not the file's: the warning says so (before, it named tiny.yaml)
    assert message.startswith("the command's --set uses keys of the previous layout (--set filter.max_new_tokens "
                              "is now check.max_new_tokens; "), message
    assert "--set filter.engine.backend is now check.engine.backend" in message
    assert loaded("tiny", ["check.max_new_tokens=12"])[1] == []  # the new form warns of nothing


def test_an_old_base_under_a_new_profile_and_a_key_given_twice(tmp_path):
    (tmp_path / "base.yaml").write_text(OLD)
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {tmp_path / 'base.yaml'}\nname: child\nfilter: {{min_executed: 0.2}}\n")
    profile, [message] = loaded(child)
    assert profile.check.max_new_tokens == 24 and profile.filter.min_executed == 0.2
    assert "filter.max_new_tokens is now check.max_new_tokens" in message
    both = tmp_path / "both.yaml"
    both.write_text("extends: tiny\nname: both\ncheck: {model: a}\nfilter: {model: b}\n")
    with pytest.raises(ProfileError, match="filter.model and check.model are both set"):
        load_profile(str(both))


def test_min_attributes_kept_zero_still_asks_no_attribute_question():
    profile, [message] = loaded("tiny", ["filter.min_attributes_kept=0"])
    assert profile.check.attributes is False and "set check.attributes: false" in message
    profile, moved = loaded("tiny", ["filter.min_attributes_kept=0", "check.attributes=true"])
    assert profile.check.attributes is True and moved == []


def test_a_saved_profile_of_the_old_layout_validates():
    """A finished run's profile.json (views/inspect.py reads it back) predates the sections."""
    data = {"name": "run", "filter": {"model": "m", "template": "filter_v2", "min_executed": 0.3}}
    with pytest.warns(ProfileMigrationWarning, match="filter.template is now check.template"):
        profile = Profile.model_validate(data)
    assert (profile.check.model, profile.filter.min_executed) == ("m", 0.3)


OLD_RELABEL = """name: old-relabel
extends: tiny
relabel:
  rewards:
    imagereward: {kind: imagereward, model: imagereward, processor: imagereward/tokenizer, weight: 1.0}
    pickscore: {kind: pickscore, model: pickscore, weight: 0.5}
    clip: {kind: clip, model: clip, weight: 0.0}
    hpsv2: {kind: hpsv2, model: hpsv2, weight: 0.0}
  report_only: [clip]
  subject_gate: {model: dinov2, patch: 28, stride: 14, min_consistency: 0.3}
  dtype: float16
  batch_size: 4
  min_margin: 0.1
"""


def test_old_relabel_rewards_split_into_score_models_and_relabel_weights(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(OLD_RELABEL)
    profile, [message] = loaded(path)
    # scored as before: the voting rewards and the report-only one; hpsv2 (weight 0, not reported) never was
    assert profile.score.scored() == ["imagereward", "pickscore", "clip"]
    assert profile.relabel.voting(profile.score.scored()) == ["imagereward", "pickscore"]
    assert (profile.relabel.weight("pickscore"), profile.relabel.weight("clip")) == (0.5, 0.0)
    assert (profile.score.dtype, profile.score.batch_size, profile.score.subject_gate.patch) == ("float16", 4, 28)
    assert (profile.relabel.min_consistency, profile.relabel.min_margin) == (0.3, 0.1)
    for note in ("relabel.rewards is now score.rewards", "relabel.dtype is now score.dtype",
                 "relabel.subject_gate is now score.subject_gate", "relabel.rewards.hpsv2 (weight 0, not in report_only)"):
        assert note in message


def test_old_relabel_overrides_move_to_their_sections():
    profile, [message] = loaded("tiny", ["relabel.rewards.imagereward.weight=2", "relabel.rewards.clip.model=other",
                                         "relabel.subject_gate.min_consistency=0.2", "relabel.subject_gate.patch=14",
                                         "relabel.dtype=float16"])
    assert profile.relabel.weights == {"imagereward": 2.0} and profile.score.rewards["clip"].model == "other"
    assert (profile.relabel.min_consistency, profile.score.subject_gate.patch, profile.score.dtype) == (0.2, 14, "float16")
    for note in ("relabel.rewards.imagereward.weight is now relabel.weights.imagereward",
                 "relabel.rewards.clip.model is now score.rewards.clip.model",
                 "relabel.subject_gate.min_consistency is now relabel.min_consistency"):
        assert note in message
    # a whole old rewards block given on the command line replaces score.rewards, as it replaced relabel.rewards
    profile, _ = loaded("tiny", ["relabel.rewards={clip: {kind: clip, model: clip}}", "relabel.report_only=[]"])
    assert profile.score.scored() == ["clip"] and profile.relabel.weights == {"clip": 1.0}


def test_old_report_only_alone_stops_those_rewards_voting():
    profile, [message] = loaded("tiny", ["relabel.weights={imagereward: 1.0, pickscore: 2.0}",
                                         "relabel.report_only=[imagereward]"])
    assert profile.relabel.weights == {"pickscore": 2.0} and "relabel.report_only is gone" in message
    from richpref.schemas.migrate import split_relabel

    data = {"score": {"rewards": {"clip": {}, "hpsv2": {}, "ict": {}}}, "relabel": {"report_only": ["hpsv2"]}}
    split_relabel(data, "here", strict=False)
    assert data["relabel"] == {"weights": {"clip": 1.0, "ict": 1.0}}  # no weights yet: every scored reward voted
    data = {"relabel": {"report_only": ["clip"], "weights": {"clip": 2.0, "ict": 0.5}}}
    split_relabel(data, "here", strict=False)
    assert data["relabel"] == {"weights": {"ict": 0.5}}


@pytest.mark.parametrize("block,clash", [
    ("  rewards: {clip: {kind: clip, model: clip}}\n", "relabel.rewards and score.rewards are both set"),
    ("  subject_gate: {model: dinov2}\n", "relabel.subject_gate and score.subject_gate are both set"),
])
def test_one_file_setting_a_relabel_block_in_both_layouts_is_refused(tmp_path, block, clash):
    inner = block.strip().split(":", 1)[0]
    path = tmp_path / "both.yaml"
    path.write_text(f"name: both\nextends: tiny\nrelabel:\n{block}score:\n{block}")
    with pytest.raises(ProfileError, match=f"{clash}.*remove relabel.{inner}"):
        load_profile(str(path))


def test_old_relabel_blocks_split_by_hand():
    from richpref.schemas.migrate import split_relabel

    data = {"relabel": {"rewards": {"unused": {"kind": "ict", "weight": 0}, "b": {"kind": "clip"}, "c": {"weight": 2}}}}
    assert split_relabel(data, "here", strict=True)[0].startswith("relabel.rewards.unused (weight 0, not in report_only)")
    assert data == {"score": {"rewards": {"b": {"kind": "clip"}, "c": {}}}, "relabel": {"weights": {"b": 1.0, "c": 2}}}
    data = {"score": {"subject_gate": {"model": "dinov2", "stride": 14}},
            "relabel": {"subject_gate": {"patch": 28, "min_consistency": 0.2}}}
    split_relabel(data, "here", strict=False)  # an override's old block merges into the profile's gate
    assert data == {"score": {"subject_gate": {"model": "dinov2", "stride": 14, "patch": 28}},
                    "relabel": {"min_consistency": 0.2}}
    data = {"relabel": {"subject_gate": None}}
    split_relabel(data, "here", strict=True)
    assert data == {"score": {"subject_gate": None}, "relabel": {}}
    assert split_relabel({"relabel": {"min_margin": 0.1}}, "here", strict=True) == []
