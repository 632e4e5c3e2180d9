"""Pydantic configs of every stage and of a profile.

Unknown keys are errors (`extra="forbid"`), so a typo fails before any model loads. `batch_size`,
`device` and `dtype` only change how fast a stage runs, not what it computes, so they are left out of
the stage's config hash (and so of its cache key).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .diffusion import PipelineSettings
from .editors import EditorSettings, PromptMode
from .serving import EngineConfig, ImageCaps, key_view

# Also left out: how a stage runs, not what it computes (onnxruntime providers, torch.compile, memory
# layout, whether a pair's questions share one image prefix).
RUNTIME_FIELDS = frozenset({"batch_size", "device", "dtype", "share_image_prefix", "providers", "compile",
                            "channels_last"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageConfig(_Strict):
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


class SourceConfig(_Strict):
    """Where prompts (and optionally images) come from."""

    kind: Literal["prompts", "jsonl", "parquet", "hf"] = "prompts"
    path: str | None = None  # local file(s), folder or glob for prompts/jsonl/parquet
    dataset: str | None = None  # for kind "hf": Hub id (local Hub cache when offline), dir saved with `datasets`, or a folder of data files
    split: str = "train"
    revision: str | None = None  # Hub revision (branch, tag or commit) for kind "hf"
    prompt_column: str = "caption"
    image_column: str | None = None  # a column of encoded image bytes to use instead of sampling
    pickapic_preferred: bool = False  # take the preferred image of a Pick-a-Pic pair (jpg_0/jpg_1/label_0)
    # A Pick-a-Pic tie (label_0 = 0.5) has no preferred image: rejected (as the DPO trainers skip
    # ties), or "keep" takes jpg_0.
    pickapic_ties: Literal["reject", "keep"] = "reject"
    # Drop repeats: rows whose image (or prompt) an earlier row of the range already had are rejected
    # as `duplicate: <item_id of the first>`. Default: "image" for Pick-a-Pic sources, else "none".
    dedupe: Literal["image", "prompt", "none"] | None = None
    offset: int = Field(0, ge=0)  # first row read (rows before it are never read)
    limit: int | None = Field(None, ge=1)
    shard_size: int = Field(8, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)

    @property
    def effective_dedupe(self) -> str:
        return self.dedupe or ("image" if self.pickapic_preferred else "none")


class SampleConfig(StageConfig, PipelineSettings):
    HASHED_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"variant"})  # scheduler was always hashed

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    use_dataset_image: bool = True  # when the source row carries an image, keep it instead of generating
    variant: str | None = None  # weight files variant to load, e.g. "fp16" (x.fp16.safetensors) where the repo has it
    steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    height: int = Field(512, ge=8)
    width: int = Field(512, ge=8)
    seed: int = 0  # mixed with item_id: a rerun reproduces the same image
    # Tuned weights over `model` (RPO rounds): a LoRA (file, folder or finetune output) or a full UNet
    # (diffusers folder or finetune output). Their content is part of the stage's key.
    lora: str | None = None
    unet: str | None = None

    @model_validator(mode="after")
    def _one_tuning(self) -> "SampleConfig":
        if self.lora and self.unet:
            raise ValueError("sample.lora and sample.unet are exclusive: give the LoRA or the tuned UNet")
        return self


class VLMStageConfig(StageConfig):
    model: str
    template: str
    max_new_tokens: int = Field(128, ge=1)
    trust_remote_code: bool = False
    engine: EngineConfig = EngineConfig()  # in-process, or an OpenAI-compatible server (schemas/serving.py)
    image: ImageCaps = ImageCaps()  # pixel caps = image-token caps


class CritiqueConfig(VLMStageConfig):
    model: str = "lmms-lab/llava-critic-7b"
    template: str = "critique_v2"
    max_new_tokens: int = 256
    reject_no_issues: bool = True  # a critique that finds nothing to fix ("No issues.") ends the item


class InstructConfig(VLMStageConfig):
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    template: str = "instruct_v1"
    one_step: bool = False  # instructions from image + prompt only, no critique (RPO ablation)
    onestep_template: str = "instruct_onestep_v1"  # the template used when one_step is set
    max_instructions: int = Field(5, ge=1)
    max_instruction_chars: int = Field(200, ge=8)
    # Guards (RPO appendix D), tuned on tests/data/instruction_corpus.yaml (docs/instruction_guards.md).
    # Contradiction: drop instructions that remove, replace or recolour what the prompt asks for.
    drop_contradictions: bool = True
    drop_vague: bool = True  # drop instructions without a content word ("Improve the overall quality")
    # Grounding: share of an instruction's content words found in the prompt + critique (prompt
    # only when one_step); 0 turns it off. Low on purpose: elaborations ("terracotta roofs") are
    # good instructions; it catches additions that share no word with either.
    min_grounding: float = Field(0.1, ge=0, le=1)
    # Visibility: P(yes) that the thing an instruction changes is in the image; 0 turns it off.
    min_visible: float = Field(0.5, ge=0, le=1)
    visible_template: str = "instruct_visible_v1"
    # Model-judged faithfulness: P(yes) that the instruction serves the prompt without removing,
    # replacing or contradicting what it asks for or adding unrelated content; 0 turns it off.
    min_faithful: float = Field(0.0, ge=0, le=1)
    faithful_template: str = "instruct_faithful_v1"
    drop_truncated: bool = True  # drop the last instruction when max_new_tokens cut the output
    on_guard_fail: Literal["drop_instruction", "reject_row"] = "drop_instruction"


class EditConfig(EditorSettings, StageConfig, PipelineSettings):
    # kind (controlnet_img2img | instruct_pix2pix | flux_kontext | qwen_image_edit) and each kind's
    # settings: see schemas/editors.py.
    prompt_mode: PromptMode = "prompt_plus_instructions"
    joiner: str = ", "
    seed: int = 0
    # Edit candidates per item, each with its own seed (candidate 0 keeps the item's seed); relabel
    # pairs them by `relabel.pairing`.
    num_edits: int = Field(1, ge=1, le=64)
    min_pixel_change: float = Field(0.01, ge=0)  # below this mean |Δ|/255 the edit is "no visible change"


class CutoutConfig(StageConfig):
    model: str = "u2net"  # rembg session name, or "u2net_custom" with model_path
    model_path: str | None = None
    home: str | None = None  # U2NET_HOME; relative paths resolve against models_root
    # onnxruntime execution providers, e.g. [CUDAExecutionProvider, CPUExecutionProvider]; unset: from
    # `device` (auto: CUDA when this onnxruntime build has it, else CPU). Not part of the cache key.
    providers: list[str] | None = None
    min_fg_ratio: float = Field(0.0, ge=0, le=1)


class FilterConfig(VLMStageConfig):
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    template: str = "filter_v2"
    max_new_tokens: int = 64  # for the attribute list
    min_executed: float = Field(0.5, ge=0, le=1)
    executed_reduce: Literal["mean", "min"] = "mean"  # over the per-instruction P(yes)
    min_no_stray: float = Field(0.5, ge=0, le=1)
    min_subject_kept: float = Field(0.5, ge=0, le=1)
    # UPER §3.2.1 attribute check: the VLM lists the subject's key attributes in the original cut-out;
    # an attribute counts as present where P(yes) >= min_attribute_present. Of the attributes present
    # in the original, at least min_attributes_kept (a share) must be present in the edit; 0 turns
    # the check off. Attributes the instructions name are expected to change and are exempt.
    max_attributes: int = Field(5, ge=1)
    min_attribute_present: float = Field(0.5, ge=0, le=1)
    min_attributes_kept: float = Field(0.8, ge=0, le=1)
    exempt_instructed_attributes: bool = True
    on_no_attributes: Literal["keep", "drop"] = "keep"  # when no listed attribute is present in the original
    # In-process: the questions about one image run on one cached image+prompt prefix (the image is
    # encoded once per pair and image); same probabilities up to float noise, so not in the key.
    share_image_prefix: bool = True


# Options each reward kind takes besides kind/model/weight (see richpref/models/rewards).
REWARD_OPTIONS: dict[str, frozenset[str]] = {
    "clip": frozenset({"processor", "on_cutout"}),
    "pickscore": frozenset({"processor", "on_cutout"}),
    "imagereward": frozenset({"processor", "file", "on_cutout"}),
    "hpsv2": frozenset({"file", "version", "on_cutout"}),
    "aesthetic": frozenset({"backbone", "file", "on_cutout"}),
    "ict": frozenset({"backbone", "processor", "file", "on_cutout"}),
    "hp": frozenset({"backbone", "processor", "file", "on_cutout"}),
    "dino_patch": frozenset({"patch", "stride", "on_cutout"}),
    "vlm_score": frozenset({"template", "on_cutout", "engine"}),
}


HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # in xswu/HPSv2


class RewardSpec(_Strict):
    kind: Literal["clip", "pickscore", "imagereward", "hpsv2", "aesthetic", "ict", "hp", "dino_patch", "vlm_score"]
    model: str  # model dir / Hub id; for aesthetic the head file (or the dir/repo holding `file`)
    weight: float = 1.0
    processor: str | None = None  # processor/tokenizer source when `model` has none (PickScore: the laion CLIP)
    backbone: str | None = None  # base CLIP the checkpoint sits on (aesthetic: ViT-L/14; ict/hp: laion ViT-H-14)
    file: str | None = None  # checkpoint file inside `model` (ImageReward.pt, HPS_v2.1_compressed.pt, …)
    on_cutout: bool = False  # score the foreground cut-outs (cutout stage) instead of the full images
    patch: int | None = Field(None, ge=1)  # dino_patch window size (default 224)
    stride: int | None = Field(None, ge=1)  # dino_patch window stride (default 112)
    template: str | None = None  # vlm_score question template in richpref/prompts (default reward_score_v1)
    engine: EngineConfig = EngineConfig()  # vlm_score: in-process or served (schemas/serving.py)
    # hpsv2: which HPS. v2.0 and v2.1 scores are not comparable (SD1.4: 26.95 vs 25.35); RPO's Table 1 and
    # Diffusion-DPO report v2.0, the hpsv2 package's default. Unset: read from `file`, else v2.0.
    version: Literal["v2.0", "v2.1"] | None = None

    @model_validator(mode="after")
    def _options_fit_kind(self) -> "RewardSpec":
        allowed = REWARD_OPTIONS[self.kind]
        given = {k for k in ("processor", "backbone", "file", "patch", "stride", "template", "version") if getattr(self, k) is not None}
        given |= {"on_cutout"} if self.on_cutout else set()
        given |= {"engine"} if self.engine != EngineConfig() else set()
        extra = sorted(given - allowed)
        if extra:
            raise ValueError(f"reward kind {self.kind!r} takes no {', '.join(extra)}; it takes {', '.join(sorted(allowed))}")
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


class RelabelConfig(StageConfig):
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
    # z-score group: the shard, or each item's images centred on the item's mean and scaled by the
    # shard's spread around the item means (a per-item spread would turn every gap into a +-1 vote).
    standardize: Literal["shard", "item"] = "shard"
    # With several edits per item: the best edit against the original, or the best image of the item
    # (original included) against the worst. Identical when num_edits is 1.
    pairing: Literal["best_vs_original", "best_vs_worst"] = "best_vs_original"
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
        return self

    def voting(self) -> list[str]:
        """The rewards in the composite (non-zero weight)."""
        return [n for n, s in self.rewards.items() if s.weight != 0]

    def scored(self) -> list[str]:
        """The rewards loaded and scored: the voting ones, then the report-only ones."""
        return self.voting() + [n for n in self.rewards if n in self.report_only]


class ExportConfig(_Strict):
    pass


class Profile(_Strict):
    name: str
    models_root: str | None = None
    source: SourceConfig = SourceConfig()
    sample: SampleConfig = SampleConfig()
    critique: CritiqueConfig = CritiqueConfig()
    instruct: InstructConfig = InstructConfig()
    edit: EditConfig = EditConfig()
    cutout: CutoutConfig = CutoutConfig()
    filter: FilterConfig = FilterConfig()
    relabel: RelabelConfig = RelabelConfig()
    export: ExportConfig = ExportConfig()


STAGE_SECTIONS = ("source", "sample", "critique", "instruct", "edit", "cutout", "filter", "relabel", "export")


class ProfileError(ValueError):
    pass


def config_hash(cfg: BaseModel | dict) -> str:
    """Hash of what a stage computes: its config minus the runtime-only fields (or a stage's own view of it)."""
    if isinstance(cfg, dict):
        data = cfg
    else:
        exclude = set(RUNTIME_FIELDS) & set(type(cfg).model_fields)
        exclude |= {f for f in getattr(type(cfg), "HASHED_WHEN_SET", ()) if getattr(cfg, f) is None}
        data = key_view(cfg, cfg.model_dump(mode="json", exclude=exclude))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def profile_hash(profile: Profile) -> str:
    parts = {s: config_hash(getattr(profile, s)) for s in STAGE_SECTIONS}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def configs_dirs() -> list[Path]:
    here = Path(__file__).resolve().parents[2] / "configs"
    return [Path.cwd() / "configs", here]


def find_profile(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    for d in configs_dirs():
        c = d / f"{name_or_path}.yaml"
        if c.exists():
            return c
    names = sorted({c.stem for d in configs_dirs() if d.is_dir() for c in d.glob("*.yaml")
                    if not c.stem.startswith(("finetune-", "evaluate-", "rounds-"))})
    raise ProfileError(f"profile {name_or_path!r} not found; give a YAML path or one of: {', '.join(names)}")


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """`stage.key=value` strings (value parsed as YAML) applied on top of the profile's YAML."""
    for item in overrides or []:
        if "=" not in item:
            raise ProfileError(f"override {item!r} must look like section.key=value (e.g. edit.strength=0.6)")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ProfileError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def read_profile_data(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A profile's YAML as a dict. `extends: <profile>` starts from that profile: each section the
    file names replaces the base's whole section (so `edit:` in a profile that extends `tiny` sets
    the editor without inheriting settings of another editor kind)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {path}: not valid YAML ({exc})") from exc
    base = data.pop("extends", None) if isinstance(data, dict) else None
    if base is None:
        return data
    base_path = find_profile(str(base))
    if base_path.resolve() in seen or base_path.resolve() == path.resolve():
        raise ProfileError(f"profile {path}: `extends: {base}` makes a cycle")
    return {**read_profile_data(base_path, (*seen, path.resolve())), **data}


def load_profile(name_or_path: str, overrides: list[str] | None = None, models_root: str | None = None) -> Profile:
    path = find_profile(name_or_path)
    data = read_profile_data(path)
    data = apply_overrides(data, overrides)
    if models_root or os.environ.get("RICHPREF_MODELS_ROOT"):
        data["models_root"] = models_root or os.environ["RICHPREF_MODELS_ROOT"]
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"profile {path} is invalid:\n{exc}") from exc
