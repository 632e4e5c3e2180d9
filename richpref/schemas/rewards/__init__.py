"""The reward kinds: one declaration per kind, found by walking this package.

Each module here declares the kinds of one scorer module of richpref/models/rewards (same file name)
as `KINDS = (RewardKind(...), ...)`: the kind's name, the options a profile may set for it and what an
unset one means, how to load it (a `module:callable` of richpref/models/rewards, imported only when a
profile scores with it) and its tiny random-weight twin (a builder of richpref/models/tiny). The
config's allowed kinds (`score.rewards.*.kind`), the options each takes, the loader table and the
tiny models' layout are all read from `REWARD_KINDS`; nothing else lists the kinds.

Adding a reward: its scorer (richpref/models/rewards/<kind>.py), its declaration here
(richpref/schemas/rewards/<kind>.py) and its tiny twin's builder (richpref/models/tiny/<family>.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..plugins import TinyTwin, discover

__all__ = ["KIND_NAMES", "REWARD_KINDS", "RewardKind", "TinyTwin"]


@dataclass(frozen=True)
class RewardKind:
    kind: str
    loader: str  # `module:callable` of richpref.models.rewards: callable(path, device=, dtype=, **options, **fixed)
    options: tuple[str, ...] = ()  # the profile options it passes to the loader (besides model, weight, on_cutout)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # what an unset option means (the loader's default)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # loader arguments no profile sets (clip vs pickscore)
    on_cutout: bool = True  # whether it may score the foreground cut-outs
    pairwise: bool = False  # scores (original, edit) together, not each image
    reads_instruction: bool = False  # reads each edit's instructions (the edit stage's)
    edit_gate: bool = False  # its score may gate edits (`relabel.edit_gate`)
    gate_scale: tuple[float, float] | None = None  # the range `edit_gate.min_score` lies in (None: unbounded)
    judge_server: bool = False  # served by richpref's judge server (a reward head), not an OpenAI chat server
    tiny: TinyTwin | None = None

    @property
    def allowed(self) -> frozenset[str]:
        """Every option a profile may set for it besides kind, model and weight."""
        return frozenset(self.options) | ({"on_cutout"} if self.on_cutout else frozenset())


def _discover() -> dict[str, RewardKind]:
    return discover(__name__, __path__, "reward kind")


REWARD_KINDS: dict[str, RewardKind] = _discover()
KIND_NAMES: tuple[str, ...] = tuple(REWARD_KINDS)
