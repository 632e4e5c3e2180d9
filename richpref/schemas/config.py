"""Pydantic configs of every stage and of a profile.

Unknown keys are errors (`extra="forbid"`), so a typo fails before any model loads. `batch_size`,
`device` and `dtype` only change how fast a stage runs, not what it computes, so they are left out of
the stage's config hash (and so of its cache key).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from .config_errors import invalid_message
from .common import RUNTIME_FIELDS, StageConfig, _Strict
from .diffusion import PipelineSettings
from .editors import EditorSettings, PromptMode
from .rebuild import check_pipeline
from .relabel import HPS_FILES, REWARD_OPTIONS, RewardModel, RewardSpec  # noqa: F401 - re-exported
from .migrate import migrate, move_override, move_sections, warn_moved
from .serving import key_view
from .stages.check import CheckConfig
from .stages.filter import FilterConfig
from .stages.relabel import RelabelConfig, check_votes
from .stages.score import ScoreConfig, SubjectGateConfig  # noqa: F401 - re-exported
from .vlm import VLMStageConfig  # noqa: F401 - re-exported


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
    HASHED_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"variant", "max_sequence_length", "num_samples"})  # scheduler was always hashed

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    use_dataset_image: bool = True  # when the source row carries an image, keep it instead of generating
    variant: str | None = None  # weight files variant to load, e.g. "fp16" (x.fp16.safetensors) where the repo has it
    steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    height: int = Field(512, ge=8)
    width: int = Field(512, ge=8)
    seed: int = 0  # mixed with item_id: a rerun reproduces the same image
    # Keep the checkpoint's safety checker (SD 1.5 ships one): off by default, as the reference
    # Diffusion-DPO sampling does; on, every image it flags comes out black (then rejected as flat).
    safety_checker: bool = False
    # Images (generated or from the dataset) whose pixel std (0-255) is below this are rejected as
    # `flat_image` (near-constant: a safety checker's black output, a blank image); 0 turns it off.
    min_image_std: float = Field(1.0, ge=0)
    # Prompt tokens of the T5 / Qwen2.5-VL encoders of flow-matching models (None: the pipeline's default).
    max_sequence_length: int | None = Field(None, ge=1)
    # Tuned weights over `model` (RPO rounds): a LoRA (file, folder or finetune output) or a full UNet
    # (diffusers folder or finetune output). Their content is part of the stage's key.
    lora: str | None = None
    unet: str | None = None
    # Images per prompt (`pipeline: rebuild`): sample k of an item is seeded from (seed, item, k), sample 0
    # with the item's own seed (the image an edit-pipeline run makes). Unset: one.
    num_samples: int | None = Field(None, ge=1, le=64)

    @model_validator(mode="after")
    def _one_tuning(self) -> "SampleConfig":
        if self.lora and self.unet:
            raise ValueError("sample.lora and sample.unet are exclusive: give the LoRA or the tuned UNet")
        return self


class CritiqueConfig(VLMStageConfig):
    model: str = "lmms-lab/llava-critic-7b"
    template: str = "critique_v2"
    max_new_tokens: int = Field(256, ge=1)
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
    # An edit prompt past a text encoder's limit (CLIP: 77 tokens): "cap" keeps the leading
    # instructions that fit and records the rest; "truncate" gives it whole (the encoder cuts it) and
    # records those past the cut. Check asks only about the instructions that reached the editor.
    long_prompt: Literal["cap", "truncate"] = "cap"


class CutoutConfig(StageConfig):
    model: str = "u2net"  # rembg session name, or "u2net_custom" with model_path
    model_path: str | None = None
    home: str | None = None  # U2NET_HOME; relative paths resolve against models_root
    # onnxruntime execution providers, e.g. [CUDAExecutionProvider, CPUExecutionProvider]; unset: from
    # `device` (auto: CUDA when this onnxruntime build has it, else CPU). Not part of the cache key.
    providers: list[str] | None = None
    min_fg_ratio: float = Field(0.0, ge=0, le=1)


class ExportConfig(_Strict):
    # Both images of a pair leave at the edit's size in one encoding: png (lossless) or jpeg at
    # `jpeg_quality` (unset: the source image's quality, read from its quantisation tables).
    image_format: Literal["png", "jpeg"] = "png"
    jpeg_quality: int | None = Field(None, ge=1, le=100)
    # edit_mask: changed where max-channel |jpg_0 - jpg_1| > mask_threshold (0..255), specks removed,
    # dilated by mask_dilation px (see richpref/tasks/pair_images.py, docs/labels.md).
    mask_threshold: int = Field(32, ge=0, le=254)
    mask_dilation: int = Field(8, ge=0, le=256)


class Profile(_Strict):
    name: str
    # Which stages run: RPO's edit pipeline, or `rebuild` (prompts -> sample.num_samples images ->
    # rewards -> pairs of samples ranked by the rewards; docs/rebuild.md), or `relabel_dataset` (a
    # Pick-a-Pic-format Parquet source's pairs rescored: richpref relabel-dataset). Not hashed: the stages' keys differ.
    pipeline: Literal["edit", "rebuild", "relabel_dataset"] = "edit"
    # What the profile is and what it adds to RPO's pipeline; the dataset card quotes it. Not hashed.
    description: str | None = None
    models_root: str | None = None
    source: SourceConfig = SourceConfig()
    sample: SampleConfig = SampleConfig()
    critique: CritiqueConfig = CritiqueConfig()
    instruct: InstructConfig = InstructConfig()
    edit: EditConfig = EditConfig()
    cutout: CutoutConfig = CutoutConfig()
    check: CheckConfig = CheckConfig()
    filter: FilterConfig = FilterConfig()
    score: ScoreConfig = ScoreConfig()
    relabel: RelabelConfig = RelabelConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="before")
    @classmethod
    def _previous_layout(cls, data):
        """A saved profile of the previous layout (a run's profile.json) still loads, with a warning."""
        if isinstance(data, dict) and {"filter", "relabel"} & set(data):
            data = copy.deepcopy(data)  # the caller's dict stays as given
            warn_moved(migrate(data, "data"), "a saved profile uses keys")
        return data

    @model_validator(mode="after")
    def _pipeline_fits(self) -> "Profile":
        check_votes(self.score, self.relabel)
        check_pipeline(self)
        return self


def sections(profile_type: type[BaseModel]) -> tuple[str, ...]:
    """The sections stages key on: every field of the profile that is a config model, in profile order
    (a new stage's section is a Profile field and nothing else to list)."""
    return tuple(name for name, field in profile_type.model_fields.items()
                 if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))


STAGE_SECTIONS = sections(Profile)


class ProfileError(ValueError):
    pass


def config_data(cfg: BaseModel) -> dict:
    """What a stage computes from its section: the section minus the runtime-only fields."""
    exclude = set(RUNTIME_FIELDS) & set(type(cfg).model_fields)
    exclude |= {f for f in getattr(type(cfg), "HASHED_WHEN_SET", ()) if getattr(cfg, f) is None}
    return key_view(cfg, cfg.model_dump(mode="json", exclude=exclude))


def config_hash(cfg: BaseModel | dict) -> str:
    """Hash of what a stage computes: its config minus the runtime-only fields (or a stage's own view of it)."""
    data = cfg if isinstance(cfg, dict) else config_data(cfg)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def profile_hash(profile: Profile) -> str:
    parts = {s: config_hash(getattr(profile, s)) for s in sections(type(profile))}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def configs_dirs() -> list[Path]:
    here = Path(__file__).resolve().parents[2] / "configs"
    return [Path.cwd() / "configs", here]


CONFIG_KINDS = ("finetune", "evaluate", "rounds")  # configs/<kind>-<name>.yaml; the other YAMLs are profiles


def find_profile(name_or_path: str, kind: str = "profile", folder: Path | None = None) -> Path:
    """The YAML of a profile (`kind` "profile") or of a finetune, evaluate or rounds config: a path, or a
    name under configs/; a config's name may leave out its kind, as its deployment does
    (`finetune --config flux-dev-flowdpo`, deployment finetune/flux-dev-flowdpo: finetune-flux-dev-flowdpo.yaml).
    A YAML path is looked for in `folder` (an extending file's own) first, then the working folder.
    Not found: the message lists the names of that kind only."""
    p = Path(name_or_path)
    for candidate in ([folder / p] if folder is not None else []) + [p]:
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate
    prefixed = kind in CONFIG_KINDS and not name_or_path.startswith(f"{kind}-")
    for name in ([f"{kind}-{name_or_path}"] if prefixed else []) + [name_or_path]:
        for d in configs_dirs():
            c = d / f"{name}.yaml"
            if c.exists():
                return c
    stems = {c.stem for d in configs_dirs() if d.is_dir() for c in d.glob("*.yaml")}
    names = sorted(n for n in stems if (n.startswith(f"{kind}-") if kind in CONFIG_KINDS
                                        else not n.startswith(tuple(f"{k}-" for k in CONFIG_KINDS))))
    what = "profile" if kind not in CONFIG_KINDS else f"{kind} config"
    raise ProfileError(f"{what} {name_or_path!r} not found; give a YAML path or one of: {', '.join(names)}")


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """`stage.key=value` strings (value parsed as YAML) applied on top of the profile's YAML. A number
    steps into a list (`models.1.path=...`: the second entry's path)."""
    for item in overrides or []:
        if "=" not in item:
            raise ProfileError(f"override {item!r} must look like section.key=value (e.g. edit.strength=0.6)")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            key = _key_in(node, k, item)
            if isinstance(node, dict) and node.get(key) is None:  # absent, or an empty `key:` line
                node[key] = {}
            node = node[key]
            if not isinstance(node, (dict, list)):
                raise ProfileError(f"override {item!r}: {k!r} is not a section")
        node[_key_in(node, keys[-1], item)] = yaml.safe_load(raw)
    return data


def _key_in(node: dict | list, k: str, item: str) -> str | int:
    if isinstance(node, dict):
        return k
    if not (k.isdigit() and int(k) < len(node)):
        raise ProfileError(f"override {item!r}: {k!r} is not an entry of a list of {len(node)}: give its index, "
                           f"0 to {len(node) - 1}, or set the whole list")
    return int(k)


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A config file's YAML, which must be a mapping of keys (an empty file: no keys)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{what} {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"{what} {path}: its top level is a {type(data).__name__}, not a mapping of keys "
                           "(`key: value` lines)")
    return data


def read_profile_data(path: Path, seen: tuple[Path, ...] = (), notes: list[str] | None = None) -> dict:
    """A profile's YAML as a dict. `extends: <profile>` (a name, or a YAML path from the file's own
    folder or the working one) starts from that profile: each section the
    file names replaces the base's whole section (so `edit:` in a profile that extends `tiny` sets
    the editor without inheriting settings of another editor kind). Each file's keys of the previous
    layout move to their sections before the merge (schemas/migrate.py); `notes` collects the moves."""
    data = read_yaml_mapping(path, "profile")
    try:
        moved = move_sections(data, f"profile {path}")
    except ValueError as exc:
        raise ProfileError(str(exc)) from exc
    if notes is not None:
        notes += moved
    base = data.pop("extends", None)
    if base is None:
        return data
    base_path = find_profile(str(base), folder=path.parent)
    if base_path.resolve() in seen or base_path.resolve() == path.resolve():
        raise ProfileError(f"profile {path}: `extends: {base}` makes a cycle")
    return {**read_profile_data(base_path, (*seen, path.resolve()), notes), **data}


def apply_models_root(data: dict, models_root: str | None) -> dict:
    """The command's --models-root, else RICHPREF_MODELS_ROOT, replaces a profile's or config's own
    `models_root` (where relative model references resolve)."""
    root = models_root or os.environ.get("RICHPREF_MODELS_ROOT")
    if root:
        data["models_root"] = root
    return data


def load_profile(name_or_path: str, overrides: list[str] | None = None, models_root: str | None = None) -> Profile:
    path = find_profile(name_or_path)
    notes: list[str] = []
    data = read_profile_data(path, notes=notes)
    moved = [move_override(o.split("=", 1)[0].strip()) + (o,) if "=" in o else (o, None, o) for o in overrides or []]
    set_notes = [f"--set {why}" for _, why, _ in moved if why]
    overrides = [f"{new}={o.split('=', 1)[1]}" if why else o for new, why, o in moved]
    data = apply_overrides(data, overrides)
    apply_models_root(data, models_root)
    try:
        notes += migrate(data, f"profile {path}")  # the file's keys, or a whole old block given with --set
        # a key moved from --set alone is the command's, not the file's: the user edits their command line
        warn_moved(notes + set_notes, f"profile {path} uses keys" if notes else "the command's --set uses keys")
        return Profile.model_validate(data)
    except ValueError as exc:  # a ValidationError, or a key given in both layouts
        raise ProfileError(invalid_message("profile", path, exc, Profile, overrides)) from exc
