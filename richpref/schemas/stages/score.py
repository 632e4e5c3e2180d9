"""The `score:` section: the score stage's reward models and the subject gate's DINOv2, all of its key.

Every reward named here is loaded and scored; how the scores vote (weights, z-scores, the gates'
thresholds, pairing, ties) is the `relabel:` section's, so tuning one re-runs no reward model. The
rebuild pipeline's `rewards` stage scores its samples with the same section.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..common import StageConfig, _Strict
from ..relabel import RewardModel


class SubjectGateConfig(_Strict):
    """DINOv2 patch consistency of an edit with its original (UPER §3.1.3), measured here for the
    subject gate: relabel rejects an edit that keeps less of its original than `relabel.min_consistency`
    (`subject_changed: …`). It measures how much an edit changed, not which image is better, so it
    never votes in the composite."""

    model: str  # a Dinov2Model dir / Hub id (facebook/dinov2-base)
    patch: int = Field(224, ge=1)  # window size; windows cover the whole image (the last flush with the edge)
    stride: int = Field(112, ge=1)
    on_cutout: bool = True  # compare the foreground cut-outs (cutout stage) instead of the full images


class ScoreConfig(StageConfig):
    # RPO relabels with ImageReward alone; the reference scorers run in float32 (16-bit is an opt-in).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    rewards: dict[str, RewardModel] = Field(
        default_factory=lambda: {
            "imagereward": RewardModel(kind="imagereward", model="THUDM/ImageReward", file="ImageReward.pt",
                                       processor="google-bert/bert-base-uncased"),
        }
    )
    subject_gate: SubjectGateConfig | None = None

    @field_validator("rewards")
    @classmethod
    def _names(cls, v: dict[str, RewardModel]) -> dict[str, RewardModel]:
        if not v:
            raise ValueError("score.rewards is empty: name at least one reward")
        for name in v:
            if not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
                raise ValueError(f"reward name {name!r}: use lowercase letters, digits and '_' (it names columns)")
            if v[name].kind == "dino_patch":
                raise ValueError(f"reward {name!r}: dino_patch measures how much an edit changed its original, not "
                                 "which image is better; use it as `score.subject_gate: {model: …}` with "
                                 "`relabel.min_consistency`")
        return v

    def scored(self) -> list[str]:
        """The rewards loaded and scored: every one named here."""
        return list(self.rewards)
