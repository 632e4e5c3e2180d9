"""The `relabel:` section: the relabel stage's decisions on the score stage's raw scores; no model.

Which rewards vote and how much (`weights`), the subject gate's and the edit gate's thresholds,
standardisation, pairing and ties. The rebuild pipeline's `ranked` stage reads it too.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..common import _Strict
from ..relabel import EDIT_JUDGES, GATE_SCALES, EditGateConfig
from .score import ScoreConfig


class RelabelConfig(_Strict):
    # Each scored reward's weight in the composite, by its name in score.rewards; a reward not named
    # is scored and recorded (every pair's `scores`) without a vote. Unset: every scored reward votes
    # with weight 1.
    weights: dict[str, float] | None = None
    # The subject gate (score.subject_gate measures it): an edit whose consistency with its original is
    # below this is rejected; 0 keeps every edit.
    min_consistency: float = Field(0.0, ge=-1, le=1)
    edit_gate: EditGateConfig | None = None
    # z-score group: the shard, or each item's images centred on the item's mean and scaled by the
    # shard's spread around the item means (a per-item spread would turn every gap into a +-1 vote).
    standardize: Literal["shard", "item"] = "shard"
    # With several edits per item: the best edit against the original, or the best image of the item
    # (original included) against the worst. Identical when num_edits is 1. `pipeline: rebuild` pairs
    # samples: best_vs_worst, or all_with_margin (every pair of an item's samples whose margin is above
    # min_margin).
    pairing: Literal["best_vs_original", "best_vs_worst", "all_with_margin"] = "best_vs_original"
    min_margin: float = Field(0.0, ge=0)  # composite margins at or below this are ties: dropped

    def weight(self, name: str) -> float:
        return 1.0 if self.weights is None else float(self.weights.get(name, 0.0))

    def voting(self, names: list[str]) -> list[str]:
        """The rewards of `names` (score.rewards) in the composite (non-zero weight)."""
        return [n for n in names if self.weight(n) != 0]

    def deciding(self, names: list[str]) -> set[str]:
        """The rewards whose score decides a pair: the voting ones and the edit gate's judge."""
        return set(self.voting(names)) | ({self.edit_gate.reward} if self.edit_gate else set())


def check_votes(score: ScoreConfig, relabel: RelabelConfig) -> None:
    """Raise ValueError naming the setting when relabel's decisions name what score does not measure."""
    names = score.scored()
    unknown = sorted(set(relabel.weights or {}) - set(names))
    if unknown:
        raise ValueError(f"relabel.weights names {unknown}, not in score.rewards ({', '.join(names)})")
    if not relabel.voting(names):
        raise ValueError("every scored reward has weight 0 in relabel.weights: give at least one a weight")
    gate = relabel.edit_gate
    if gate is not None and (gate.reward not in names or score.rewards[gate.reward].kind not in EDIT_JUDGES):
        judges = [n for n in names if score.rewards[n].kind in EDIT_JUDGES]
        raise ValueError(f"relabel.edit_gate.reward {gate.reward!r} is not a scored edit judge (kinds "
                         f"{', '.join(EDIT_JUDGES)}; in score.rewards: {judges or 'none'}): add it to score.rewards "
                         "(not named in relabel.weights, it gates without voting)")
    scale = GATE_SCALES[score.rewards[gate.reward].kind] if gate is not None else None
    if scale is not None and not scale[0] <= gate.min_score <= scale[1]:
        raise ValueError(f"relabel.edit_gate.min_score {gate.min_score:g} is outside {score.rewards[gate.reward].kind}'s "
                         f"scale {scale[0]:g}..{scale[1]:g}: it would keep every edit or reject every one")
    if relabel.min_consistency != 0 and score.subject_gate is None:
        raise ValueError(f"relabel.min_consistency is {relabel.min_consistency:g} but nothing measures it: set "
                         "score.subject_gate: {model: …} (a DINOv2), or drop relabel.min_consistency")
