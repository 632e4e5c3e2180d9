"""The reward models (`score.rewards`, the training's evaluate rewards) and the edit gate of `relabel:`.

The sections themselves: schemas/stages/score.py and schemas/stages/relabel.py."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..prompts import load_head_template
from .common import _Strict
from .rewards import KIND_NAMES, REWARD_KINDS
from .serving import EngineConfig, check_launcher

# Options each reward kind takes besides kind/model/weight: from its declaration (schemas/rewards/).
REWARD_OPTIONS: dict[str, frozenset[str]] = {k: d.allowed for k, d in REWARD_KINDS.items()}
# Kinds that score (original, instruction, edited) one by one: see models/rewards/edit_score.py.
EDIT_JUDGE_KINDS = tuple(k for k, d in REWARD_KINDS.items() if d.reads_instruction and not d.pairwise)
# A reward head on a Qwen-VL: served by richpref's judge server (`richpref serve judge`), not a chat server.
HEAD_JUDGE_KINDS = tuple(k for k, d in REWARD_KINDS.items() if d.judge_server)


# The checkpoint file of a reward kind when `file:` is unset (its reference's name, in its Hub repo).
JUDGE_FILES = {k: d.defaults["file"] for k, d in REWARD_KINDS.items() if "file" in d.defaults}
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # in xswu/HPSv2


class RewardModel(_Strict):
    """A reward model as the score stage loads it (its vote is relabel's: `relabel.weights`)."""

    kind: Literal[KIND_NAMES]  # every kind declared in richpref/schemas/rewards/
    model: str  # model dir / Hub id; for aesthetic the head file (or the dir/repo holding `file`)
    processor: str | None = None  # processor/tokenizer source when `model` has none (PickScore: the laion CLIP)
    backbone: str | None = None  # base CLIP the checkpoint sits on (aesthetic: ViT-L/14; ict/hp: laion ViT-H-14)
    file: str | None = None  # checkpoint file inside `model` (ImageReward.pt, HPS_v2.1_compressed.pt, …)
    on_cutout: bool = False  # score the foreground cut-outs (cutout stage) instead of the full images
    patch: int | None = Field(None, ge=1)  # dino_patch window size (default 224)
    stride: int | None = Field(None, ge=1)  # dino_patch window stride (default 112)
    # The question a VLM judge is asked: a template of richpref/prompts by name, or a text file's path
    # (vlm_score: reward_score_v1; unified_reward, edit_score, hpsv3: <kind>_v1; edit_reward: its
    # instruction-following question, edit_reward_following_v1).
    template: str | None = None
    quality_template: str | None = None  # edit_reward's visual-quality question (default edit_reward_quality_v1)
    # vlm_score and the judges: in-process or served (schemas/serving.py; hpsv3, edit_reward: launch: richpref)
    engine: EngineConfig = EngineConfig()
    adapter: str | None = None  # edit_score: the LoRA adapter (EditScore/EditScore-7B) on `model` (its base VLM)
    max_new_tokens: int | None = Field(None, ge=1)  # generative judges: answer length (default 512, as the references)
    # hpsv2: which HPS. v2.0 and v2.1 scores are not comparable (SD1.4: 26.95 vs 25.35); RPO's Table 1 and
    # Diffusion-DPO report v2.0, the hpsv2 package's default. Unset: read from `file`, else v2.0.
    version: Literal["v2.0", "v2.1"] | None = None

    @model_validator(mode="after")
    def _options_fit_kind(self) -> "RewardModel":
        allowed = REWARD_OPTIONS[self.kind]
        given = {k for k in ("processor", "backbone", "file", "patch", "stride", "template", "quality_template",
                             "version", "adapter", "max_new_tokens") if getattr(self, k) is not None}
        given |= {"on_cutout"} if self.on_cutout else set()
        given |= {"engine"} if self.engine != EngineConfig() else set()
        extra = sorted(given - allowed)
        if extra:
            raise ValueError(f"reward kind {self.kind!r} takes no {', '.join(extra)}; it takes {', '.join(sorted(allowed))}")
        if "engine" in allowed:
            check_launcher(self.engine, f"reward kind {self.kind!r}", head_judge=self.kind in HEAD_JUDGE_KINDS)
        if self.kind in HEAD_JUDGE_KINDS:  # a bad head-judge template fails before any model loads
            for t in (self.template, self.quality_template):
                if t is not None:
                    load_head_template(t)
        if self.kind == "aesthetic" and self.backbone is None:
            raise ValueError("reward kind 'aesthetic' needs `backbone:` (the CLIP ViT-L/14 its head was trained on)")
        if self.kind == "hpsv2":
            named = {f: v for v, f in HPS_FILES.items()}.get(Path(self.file).name if self.file else "")
            if self.version and named and named != self.version:
                raise ValueError(f"hpsv2 version {self.version} but file {self.file!r} is HPSv2 {named}: "
                                 f"drop `file:` or use {HPS_FILES[self.version]}")
            self.version = self.version or named or "v2.0"
        return self

    def title(self) -> str:
        """How tables and cards name what this reward measures (HPSv2 scores differ by version)."""
        return f"HPSv2 {self.version}" if self.kind == "hpsv2" else self.kind


EDIT_JUDGES = tuple(k for k, d in REWARD_KINDS.items() if d.edit_gate)  # reward kinds that judge (original, instruction, edit): usable as `edit_gate`
# What `edit_gate.min_score` is measured in, per judge: its raw score's range (None: unbounded).
GATE_SCALES = {k: REWARD_KINDS[k].gate_scale for k in EDIT_JUDGES}


class EditGateConfig(_Strict):
    """An edit judge's score as a gate: an edit it scores below `min_score` is rejected
    (`edit_judged_poor: …`) before any vote. `reward` names a reward of score.rewards (it may also
    vote; left out of relabel.weights it gates without voting). The threshold is relabel's, not part
    of the score stage's key: moving it re-runs no model.

    `min_score` is on the judge's raw scale: `edit_reward` the mean of its two heads' mu (unbounded,
    centred near 0 for the released checkpoint: compare with the scores of a few edits you trust);
    `edit_score` the overall sqrt(semantics x quality) on 0..10 (5: half-way on both questions), so a
    threshold outside 0..10 is refused. An edit the gating judge gave no score is rejected
    (`unparsed_answer: …` for edit_score), never let through."""

    reward: str
    min_score: float


class RewardSpec(RewardModel):
    """A reward model with a weight (the training's evaluate rewards; relabel-dataset's summary)."""

    weight: float = 1.0
