"""The config of RPO rounds (`richpref rounds`, the rounds flow): curate -> fine-tune -> sample from
the tuned model -> curate again, with an evaluation of every round."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .common import check_run_name
from .config_errors import invalid_message
from .config import ProfileError, apply_models_root, apply_overrides, find_profile, read_yaml_mapping


class RoundsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "rounds"  # names the run folders (<name>-round-<k>) and data/rounds/<name>/
    profile: str = "tiny"  # the curate profile of every round
    finetune: str = "finetune-tiny"  # the finetune config of every round (its `pairs` source is the round's pairs)
    evaluate: str = "evaluate-tiny"  # the evaluate config: its first model is the base row of the table
    models_root: str | None = None
    rounds: int = Field(2, ge=1)
    # Round k > 1 curates the same source rows (`same`) or the next `prompts_per_round` of them (`next`).
    prompts: Literal["same", "next"] = "same"
    prompts_per_round: int | None = Field(None, ge=1)
    # The DPO reference of round k > 1: round k-1's tuned model (the weights it starts from, so each
    # round starts at loss log 2), or the base model.
    reference: Literal["base", "previous"] = "previous"
    # Earlier rounds' pairs join round k's training data with this weight each (0: only round k's pairs).
    mix_previous: float = Field(0.0, ge=0)
    curate_overrides: list[str] = Field(default_factory=list)  # profile `--set`s for every round
    finetune_overrides: list[str] = Field(default_factory=list)
    evaluate_overrides: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _slice(self) -> "RoundsConfig":
        if self.prompts == "next" and self.prompts_per_round is None:
            raise ValueError("prompts: next needs prompts_per_round (how many source rows each round takes)")
        check_run_name(f"{self.name}-round-{self.rounds}")  # the longest run name the rounds make, checked before any runs
        return self


def load_rounds_config(name_or_path: str, overrides: list[str] | None = None,
                       models_root: str | None = None) -> RoundsConfig:
    """`configs/<name>.yaml` (e.g. rounds-tiny) or a YAML path, with `key=value` overrides. `models_root`
    (the command's --models-root), else RICHPREF_MODELS_ROOT, replaces the config's, as for every config."""
    path = find_profile(name_or_path, "rounds")
    data = read_yaml_mapping(path, "rounds config")
    data = apply_models_root(apply_overrides(data, overrides), models_root)
    try:
        return RoundsConfig.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(invalid_message("rounds config", path, exc, RoundsConfig, overrides)) from exc
