"""Configs of the score and relabel stages: the reward models, the subject gate and the decisions."""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ..prompts import load_head_template
from .common import StageConfig, _Strict
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


class RewardSpec(_Strict):
    kind: Literal[KIND_NAMES]  # every kind declared in richpref/schemas/rewards/
    model: str  # model dir / Hub id; for aesthetic the head file (or the dir/repo holding `file`)
    weight: float = 1.0
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
    def _options_fit_kind(self) -> "RewardSpec":
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


class SubjectGateConfig(_Strict):
    """DINOv2 patch consistency of an edit with its original (UPER §3.1.3) as a gate: an edit that keeps
    less of its original than `min_consistency` is rejected (`subject_changed: …`). It measures how much
    an edit changed, not which image is better, so it never votes in the composite."""

    model: str  # a Dinov2Model dir / Hub id (facebook/dinov2-base)
    patch: int = Field(224, ge=1)  # window size; windows cover the whole image (the last flush with the edge)
    stride: int = Field(112, ge=1)
    on_cutout: bool = True  # compare the foreground cut-outs (cutout stage) instead of the full images
    min_consistency: float = Field(0.0, ge=-1, le=1)  # mean cosine over windows; 0 keeps every edit


EDIT_JUDGES = tuple(k for k, d in REWARD_KINDS.items() if d.edit_gate)  # reward kinds that judge (original, instruction, edit): usable as `edit_gate`
# What `edit_gate.min_score` is measured in, per judge: its raw score's range (None: unbounded).
GATE_SCALES = {k: REWARD_KINDS[k].gate_scale for k in EDIT_JUDGES}


class EditGateConfig(_Strict):
    """An edit judge's score as a gate: an edit it scores below `min_score` is rejected
    (`edit_judged_poor: …`) before any vote. `reward` names a scored reward of relabel.rewards (it may
    also vote; give it weight 0 and name it in report_only to gate without voting). The threshold is
    not part of the score stage's key: moving it re-runs no model.

    `min_score` is on the judge's raw scale: `edit_reward` the mean of its two heads' mu (unbounded,
    centred near 0 for the released checkpoint: compare with the scores of a few edits you trust);
    `edit_score` the overall sqrt(semantics x quality) on 0..10 (5: half-way on both questions), so a
    threshold outside 0..10 is refused. An edit the gating judge gave no score is rejected
    (`unparsed_answer: …` for edit_score), never let through."""

    reward: str
    min_score: float


class RelabelConfig(StageConfig):
    HASHED_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"edit_gate"})  # unset: the keys of earlier runs hold
    # RPO relabels with ImageReward alone; the reference scorers run in float32 (16-bit is an opt-in).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    rewards: dict[str, RewardSpec] = Field(
        default_factory=lambda: {
            "imagereward": RewardSpec(kind="imagereward", model="THUDM/ImageReward", file="ImageReward.pt",
                                      processor="google-bert/bert-base-uncased", weight=1.0),
        }
    )
    # Rewards with weight 0 are neither loaded nor scored unless named here: then they are scored and
    # recorded (every pair's `scores`) without a vote.
    report_only: list[str] = Field(default_factory=list)
    subject_gate: SubjectGateConfig | None = None
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

    @field_validator("rewards")
    @classmethod
    def _names(cls, v: dict[str, RewardSpec]) -> dict[str, RewardSpec]:
        if not v:
            raise ValueError("relabel.rewards is empty: name at least one reward")
        for name in v:
            if not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
                raise ValueError(f"reward name {name!r}: use lowercase letters, digits and '_' (it names columns)")
            if v[name].kind == "dino_patch":
                raise ValueError(f"reward {name!r}: dino_patch measures how much an edit changed its original, not "
                                 "which image is better; use it as `relabel.subject_gate: {model: …, min_consistency: …}`")
        return v

    @model_validator(mode="after")
    def _votes(self) -> "RelabelConfig":
        unknown = [n for n in self.report_only if n not in self.rewards]
        if unknown:
            raise ValueError(f"relabel.report_only names {unknown}, not in relabel.rewards ({', '.join(self.rewards)})")
        voting = [n for n in self.report_only if self.rewards[n].weight != 0]
        if voting:
            raise ValueError(f"relabel.report_only names {voting} with a non-zero weight: set their weight to 0, "
                             "or remove them from report_only to let them vote")
        if not self.voting():
            raise ValueError("every relabel reward has weight 0: give at least one a weight")
        gate = self.edit_gate
        if gate is not None and (gate.reward not in self.scored() or self.rewards[gate.reward].kind not in EDIT_JUDGES):
            judges = [n for n in self.scored() if self.rewards[n].kind in EDIT_JUDGES]
            raise ValueError(f"relabel.edit_gate.reward {gate.reward!r} is not a scored edit judge (kinds "
                             f"{', '.join(EDIT_JUDGES)}; scored ones here: {judges or 'none'}): add it to relabel.rewards "
                             "with a weight, or with weight 0 and its name in report_only")
        scale = GATE_SCALES[self.rewards[gate.reward].kind] if gate is not None else None
        if scale is not None and not scale[0] <= gate.min_score <= scale[1]:
            raise ValueError(f"relabel.edit_gate.min_score {gate.min_score:g} is outside {self.rewards[gate.reward].kind}'s "
                             f"scale {scale[0]:g}..{scale[1]:g}: it would keep every edit or reject every one")
        return self

    def voting(self) -> list[str]:
        """The rewards in the composite (non-zero weight)."""
        return [n for n, s in self.rewards.items() if s.weight != 0]

    def scored(self) -> list[str]:
        """The rewards loaded and scored: the voting ones, then the report-only ones."""
        return self.voting() + [n for n in self.rewards if n in self.report_only]
