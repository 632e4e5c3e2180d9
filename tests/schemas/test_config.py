"""The profile (richpref/schemas/config.py) by stage: each stage reads its own section, and a stage's
content key follows its section only, so a threshold tuned in `filter:` (or a weight in `relabel:`)
leaves the check stage's answers (the score stage's scores) where they are, and a setting of
`check:` (`score:`) asks the model again."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from richpref.run.runner import content_key
from richpref.schemas.config import (CheckConfig, FilterConfig, Profile, ProfileError, RelabelConfig, ScoreConfig,
                                     apply_overrides, load_profile)
from richpref.tasks import STAGES

REPO = Path(__file__).resolve().parents[2]


def keys(*overrides: str) -> dict[str, str]:
    profile = load_profile("tiny", list(overrides))
    inputs = {r: SimpleNamespace(key="same input") for s in STAGES.values() for r in s.reads}
    return {name: content_key(STAGES[name], profile, 0, inputs) for name in ("check", "filter", "score", "relabel")}


def test_check_and_filter_are_sections_of_their_own():
    p = Profile(name="p")
    assert isinstance(p.check, CheckConfig) and isinstance(p.filter, FilterConfig)
    assert not set(CheckConfig.model_fields) & set(FilterConfig.model_fields)
    assert STAGES["check"].section == "check" and STAGES["filter"].section == "filter"
    assert STAGES["score"].section == "score" and STAGES["relabel"].section == "relabel"
    assert not set(ScoreConfig.model_fields) & set(RelabelConfig.model_fields)
    tiny = load_profile("tiny")
    assert (tiny.check.model, tiny.check.max_new_tokens, tiny.filter.min_executed) == ("qwen2.5-vl", 24, 0.522)
    with pytest.raises(ProfileError, match="min_executed"):  # a threshold has no place in check:
        load_profile("tiny", ["check.min_executed=0.5"])


def test_a_filter_threshold_leaves_the_check_key_a_check_setting_changes_it():
    base = keys()
    for setting in ("filter.min_executed=0.1", "filter.min_no_stray=0.9", "filter.executed_reduce=min",
                    "filter.min_attribute_present=0.7", "filter.min_attributes_kept=0.9"):
        k = keys(setting)
        assert k["check"] == base["check"] and k["filter"] != base["filter"], setting
    for setting in ("check.max_new_tokens=12", "check.template=filter_v1", "check.max_attributes=3",
                    "check.attributes=false", "check.model=other-vlm"):
        k = keys(setting)
        assert k["check"] != base["check"] and k["filter"] == base["filter"], setting
    # how the check stage runs is no part of what it computes
    assert keys("check.batch_size=2", "check.share_image_prefix=false")["check"] == base["check"]


def test_a_relabel_decision_leaves_the_score_key_a_score_setting_changes_it():
    base = keys()
    for setting in ("relabel.weights={imagereward: 2.0}", "relabel.weights={imagereward: 1.0, clip: 1.0}",
                    "relabel.min_margin=0.3", "relabel.pairing=best_vs_worst", "relabel.standardize=item",
                    "relabel.min_consistency=0.5"):
        k = keys(setting)
        assert k["score"] == base["score"] and k["relabel"] != base["relabel"], setting
    for setting in ("score.dtype=float16", "score.subject_gate.patch=14", "score.rewards.clip.model=other",
                    "score.rewards={imagereward: {kind: imagereward, model: imagereward}}"):
        k = keys(setting)
        assert k["score"] != base["score"], setting
    assert keys("score.batch_size=2", "score.device=cpu")["score"] == base["score"]



def test_a_section_added_to_the_profile_is_in_the_run_hash_with_nothing_else_to_list():
    """A new stage's section is one Profile field: the sections and profile_hash follow it."""
    from pydantic import create_model

    from richpref.schemas.config import STAGE_SECTIONS, StageConfig, profile_hash, sections

    assert STAGE_SECTIONS == ("source", "sample", "critique", "instruct", "edit", "cutout", "check", "filter", "score",
                              "relabel", "export")
    extra = create_model("ExtraConfig", __base__=StageConfig, level=(int, 1))
    bigger = create_model("BiggerProfile", __base__=Profile, extra_stage=(extra, extra()))
    assert sections(bigger) == (*STAGE_SECTIONS, "extra_stage")
    assert profile_hash(bigger(name="p")) != profile_hash(bigger(name="p", extra_stage=extra(level=2)))


def test_a_config_is_found_by_its_deployments_name_without_its_kind():
    from richpref.schemas.config import find_profile

    configs = REPO / "configs"
    assert find_profile("flux-dev-flowdpo", "finetune") == find_profile("finetune-flux-dev-flowdpo", "finetune") \
        == configs / "finetune-flux-dev-flowdpo.yaml"
    assert find_profile("flux-dev", "evaluate") == configs / "evaluate-flux-dev.yaml"
    assert find_profile("tiny", "rounds") == configs / "rounds-tiny.yaml"
    assert find_profile("tiny", "finetune") == configs / "finetune-tiny.yaml"  # not the tiny profile
    assert find_profile("tiny") == configs / "tiny.yaml"


def test_every_profile_and_config_a_command_in_the_docs_names_exists():
    """A newcomer copies `--profile X` / `--config X` from the README, the docs or the Makefile."""
    import re

    from richpref.schemas.config import find_profile

    kind_of = {"curate": "profile", "doctor": "profile", "relabel-dataset": "profile", "finetune": "finetune",
               "evaluate": "evaluate", "rounds": "rounds"}
    found = 0
    for f in [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").glob("*.md"))]:
        for line in f.read_text(encoding="utf-8").splitlines():
            command = re.search(r"\b(curate|doctor|relabel-dataset|finetune|evaluate|rounds)\b.*?--(profile|config)[ =]"
                                r"([a-z0-9][a-z0-9_.-]*)", line)
            if command is None or command.group(3).endswith((".yaml", ".yml")):
                continue
            kind = "profile" if command.group(2) == "profile" else kind_of[command.group(1)]
            if command.group(1) == "doctor" and command.group(2) == "config":
                continue
            find_profile(command.group(3), kind)  # raises, naming the missing one
            found += 1
    assert found > 20


def test_a_config_not_found_lists_the_names_of_its_own_kind():
    from richpref.schemas.config import find_profile

    def listed(kind: str) -> tuple[str, list[str]]:
        with pytest.raises(ProfileError) as err:
            find_profile("no-such-name", kind)
        head, names = str(err.value).split("; give a YAML path or one of: ")
        return head, names.split(", ")

    head, names = listed("evaluate")
    assert head == "evaluate config 'no-such-name' not found" and "evaluate-tiny" in names
    assert all(n.startswith("evaluate-") for n in names)
    head, names = listed("profile")
    assert head == "profile 'no-such-name' not found" and "tiny" in names
    assert not any(n.startswith(("evaluate-", "finetune-", "rounds-")) for n in names)
    assert listed("rounds")[1] == ["rounds-tiny"]


def test_a_field_added_after_runs_were_keyed_is_in_the_key_only_when_set():
    """Unset, `variant`, `num_samples` and `max_sequence_length` stay out of the sample stage's key, so runs keyed
    before they existed keep their shards; set, they change it."""
    from richpref.schemas.config import SampleConfig, config_data, config_hash

    data = config_data(SampleConfig())
    assert not {"variant", "max_sequence_length", "num_samples"} & set(data)
    assert "steps" in data and "scheduler" in data  # the sample stage's scheduler was always keyed
    for field, value in (("variant", "fp16"), ("num_samples", 4), ("max_sequence_length", 256)):
        changed = SampleConfig(**{field: value})
        assert config_data(changed)[field] == value and config_hash(changed) != config_hash(SampleConfig())


def test_an_override_value_may_hold_an_equals_sign():
    assert load_profile("tiny", ["edit.joiner=a=b"]).edit.joiner == "a=b"


def test_an_override_steps_into_a_list_by_index():
    # before: `--set models.1.path=...` was refused ("'models' is not a section"); the whole list had to be given
    data = {"models": [{"name": "base", "path": "sd15"}, {"name": "tuned", "path": "a"}], "tags": ["x", "y"]}
    out = apply_overrides(data, ["models.1.path=b", "models.0.lora=l", "tags.0=z"])
    assert out == {"models": [{"name": "base", "path": "sd15", "lora": "l"}, {"name": "tuned", "path": "b"}],
                   "tags": ["z", "y"]}
    for bad in ("models.2.path=c", "models.tuned.path=c", "tags.-1=c"):
        with pytest.raises(ProfileError, match=r"is not an entry of a list of 2: give its index, 0 to 1"):
            apply_overrides(data, [bad])
    with pytest.raises(ProfileError, match="'name' is not a section"):
        apply_overrides(data, ["models.0.name.x=1"])
    assert apply_overrides({"flow": None}, ["flow.shift=3"]) == {"flow": {"shift": 3}}  # an empty `flow:` line


def test_a_profile_extends_a_yaml_beside_it_from_any_working_folder(tmp_path, monkeypatch):
    """A bug: `extends: base.yaml` was looked for in the working folder only, so a profile kept beside
    its base loaded from that folder and nowhere else ("profile 'base.yaml' not found")."""
    mine = tmp_path / "profiles"
    mine.mkdir()
    (mine / "base.yaml").write_text("name: base\nextends: tiny\nedit:\n  joiner: ' / '\n")
    (mine / "large.yaml").write_text("name: large\nextends: base.yaml\nsource:\n  kind: prompts\n  shard_size: 4\n")
    monkeypatch.chdir(tmp_path)
    profile = load_profile("profiles/large.yaml")
    assert (profile.name, profile.edit.joiner, profile.source.shard_size) == ("large", " / ", 4)


def test_extends_in_a_loop_is_refused_naming_the_loop(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nextends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("name: b\nextends: a.yaml\n")
    with pytest.raises(ProfileError, match=r"`extends: a.yaml` makes a cycle"):
        load_profile(str(tmp_path / "a.yaml"))


def test_a_path_that_is_no_yaml_file_is_not_taken_for_a_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # a folder named like the profile, where a user runs the command
    assert load_profile("tiny").name == "tiny"


def test_a_config_file_that_is_no_mapping_is_refused_naming_it(tmp_path):
    from richpref.schemas.rounds import load_rounds_config
    from richpref.schemas.training import load_finetune_config

    listed = tmp_path / "listed.yaml"
    listed.write_text("- source\n- sample\n")
    for load, what in ((load_profile, "profile"), (load_finetune_config, "profile"), (load_rounds_config, "rounds config")):
        with pytest.raises(ProfileError, match=rf"{what} {listed}: its top level is a list, not a mapping of keys"):
            load(str(listed))  # before: TypeError (list indices must be integers) from the models_root step
    (tmp_path / "empty.yaml").write_text("")
    assert load_rounds_config(str(tmp_path / "empty.yaml")).name == "rounds"  # an empty file: no keys, the defaults


@pytest.mark.parametrize("override", ["critique.max_new_tokens=0", "check.max_new_tokens=0", "instruct.max_new_tokens=0"])
def test_an_answer_length_a_model_refuses_mid_run_is_refused_when_the_profile_loads(override):
    # transformers' generate raises on max_new_tokens 0 only in the stage's first shard, after sampling
    with pytest.raises(ProfileError, match=rf"- {override.split('=')[0]} \(--set {override}\): .*greater than or equal to 1"):
        load_profile("tiny", [override])


@pytest.mark.parametrize("override", ["adam_beta1=1", "adam_beta2=-0.1", "adam_epsilon=-1e-8"])
def test_an_optimizer_setting_adamw_refuses_is_refused_before_the_launch(override):
    # torch's AdamW raises on these only inside the launched training process, after the models load
    from richpref.schemas.training import load_finetune_config
    with pytest.raises(ProfileError, match=override.split("=")[0]):
        load_finetune_config("finetune-tiny", [override])
    assert load_finetune_config("finetune-tiny", ["adam_beta1=0", "adam_beta2=0.5", "adam_epsilon=0"]).adam_beta1 == 0


def test_an_unknown_key_names_where_it_came_from_and_the_nearest_known_keys(tmp_path):
    # before: pydantic's "Extra inputs are not permitted" under "profile …/tiny.yaml is invalid", as if
    # the file were wrong, and no word of the key meant
    from richpref.schemas.rounds import load_rounds_config
    from richpref.schemas.training import load_evaluate_config, load_finetune_config

    with pytest.raises(ProfileError) as err:
        load_profile("tiny", ["edit.strenght=0.5", "source.limit=abc"])
    lines = str(err.value).splitlines()[1:]
    assert "- edit.strenght (--set edit.strenght=0.5): no such key; did you mean edit.strength?" in lines
    assert any(line.startswith("- source.limit (--set source.limit=abc): Input should be a valid integer") for line in lines)
    with pytest.raises(ProfileError, match=r"- max_steps \(--set max_steps=2\): no such key; did you mean max_train_steps\?"):
        load_finetune_config("finetune-tiny", ["max_steps=2"])
    with pytest.raises(ProfileError, match=r"- roundz \(--set roundz=3\): no such key; did you mean rounds\?"):
        load_rounds_config("rounds-tiny", ["roundz=3"])
    with pytest.raises(ProfileError, match=r"- prompt \(--set prompt=\[\]\): no such key; did you mean prompts\?"):
        load_evaluate_config("evaluate-tiny", ["prompt=[]"])
    # a key in the file: its value is shown, and no --set is named; keys inside a list of sections too
    (tmp_path / "p.yaml").write_text("extends: tiny\nsource: {kind: prompts, limt: 3}\nsample: {steps: -1}\n")
    with pytest.raises(ProfileError) as err:
        load_profile(str(tmp_path / "p.yaml"))
    lines = str(err.value).splitlines()
    assert lines[0] == f"profile {tmp_path / 'p.yaml'} is invalid:"
    assert "- source.limt: no such key; did you mean source.limit?" in lines
    assert "- sample.steps: Input should be greater than or equal to 1 (is -1)" in lines
    # a check across sections: its own words, without pydantic's prefix or the whole profile's text
    with pytest.raises(ProfileError) as err:
        load_profile("tiny", ["relabel.weights.imagerewrd=1"])
    assert str(err.value).splitlines()[1] == ("- (top level): relabel.weights names ['imagerewrd'], not in score.rewards "
                                              "(imagereward, pickscore, clip, hpsv2, aesthetic, ict, hp, vlm_score)")
    (tmp_path / "f.yaml").write_text("extends: finetune-tiny\ndata: [{name: pairs, path: x, wieght: 2}]\n")
    with pytest.raises(ProfileError, match=r"- data.0.wieght: no such key; did you mean data.0.weight\?"):
        load_finetune_config(str(tmp_path / "f.yaml"))


def test_a_profile_that_changes_the_models_of_the_profile_it_extends_describes_itself():
    # the dataset card's Profile line is the profile's description: an inherited one described another
    # pipeline (tiny-sd3's card said "sd15-paper's pipeline at tiny sizes", sd35-medium-paper's "sd15-paper on SDXL")
    import yaml

    from richpref.schemas.config import CONFIG_KINDS, configs_dirs

    undescribed = []
    for path in sorted(configs_dirs()[-1].glob("*.yaml")):
        if path.stem.startswith(tuple(f"{k}-" for k in CONFIG_KINDS)):
            continue
        data = yaml.safe_load(path.read_text())
        changes = data.get("sample", {}).get("model") or data.get("edit", {}).get("kind") or "score" in data
        if data.get("extends") and changes and not data.get("description"):
            undescribed.append(path.stem)
    assert not undescribed
