"""Pydantic configs of the finetune (Diffusion-DPO) and evaluate flows.

They live in their own YAML files (`configs/finetune-*.yaml`, `configs/evaluate-*.yaml`), found the
same way as curate profiles, with the same `--set section.key=value` overrides. Unknown keys are
errors, so a typo fails before any model loads.
"""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config_errors import invalid_message
from .config import (ProfileError, RewardSpec, SourceConfig, apply_models_root, apply_overrides, find_profile,
                     read_profile_data)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PairSourceConfig(_Strict):
    """One Pick-a-Pic-format source (`caption`, `jpg_0`, `jpg_1`, `label_0`) and its mixing weight."""

    name: str | None = None  # names the source in logs; `pairs` is the one the finetune flow's `pairs` replaces
    path: str | None = None  # a Parquet file, a folder of them (e.g. data/runs/<run>/pairs) or a glob
    dataset: str | None = None  # or a `datasets` name / local dataset dir (e.g. yuvalkirstain/pickapic_v2)
    split: str = "train"
    weight: float = Field(1.0, gt=0)  # sampling probability is weight / sum of weights (RPO §4.1 mixing)
    limit: int | None = Field(None, ge=1)  # first N rows only (debugging, ablations)

    @model_validator(mode="after")
    def _one_location(self) -> "PairSourceConfig":
        if (self.path is None) == (self.dataset is None):
            raise ValueError("a data source needs exactly one of `path` (Parquet file/folder/glob) or `dataset`")
        return self

    @property
    def label(self) -> str:
        return self.name or self.path or str(self.dataset)


class LoraSettings(_Strict):
    rank: int = Field(4, ge=1)
    alpha: float | None = None  # defaults to rank (scale 1), as the reference scripts
    target_modules: list[str] = Field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    init: Literal["gaussian", "default"] = "gaussian"


FLOW_ARCHS = ("sd3", "flux", "qwen_image")


class FlowSettings(_Strict):
    """Flow-DPO (flow-matching transformers: SD3/SD3.5, FLUX.1, Qwen-Image). σ sampling and loss
    weighting as diffusers' train_dreambooth_lora_sd3.py / _flux.py (`--weighting_scheme` etc.)."""

    weighting_scheme: Literal["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = 1.29
    # σ = shift·u / (1 + (shift − 1)·u) on the sampled u; None: the checkpoint scheduler's own sigma table
    # (SD3: shift 3; FLUX/Qwen-Image use dynamic shifting at inference, so their table is unshifted).
    shift: float | None = Field(None, gt=0)
    guidance_scale: float = 3.5  # FLUX.1-dev's guidance embedding during training (diffusers' default)
    max_sequence_length: int | None = Field(None, ge=1)  # T5 / Qwen tokens; None: the pipeline's default
    text_encode_batch_size: int = Field(8, ge=1)


class FinetuneConfig(_Strict):
    """Diffusion-DPO training. Defaults follow the reference launchers (β 5000, AdamW, constant with
    warmup, lr 1e-8 scaled by the effective batch)."""

    name: str = "finetune"
    models_root: str | None = None
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # base diffusers pipeline (Hub id or dir)
    # auto: read from the pipeline folder (model_index.json, scheduler and transformer classes). A named
    # arch is checked against the checkpoint: a Flow-DPO config on a UNet checkpoint is refused.
    arch: Literal["auto", "sd15", "sdxl", "sd3", "flux", "qwen_image"] = "auto"
    flow: FlowSettings | None = None  # set: a Flow-DPO config (needs a flow-matching checkpoint)
    # Flow-DPO: the folder whose text_embeds/ caches the caption embeddings (default: the output folder).
    # Runs of one model on the same captions share it (rounds do), one run at a time.
    text_cache_dir: str | None = None
    vae: str | None = None  # another VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16)
    mode: Literal["full", "lora"] = "full"
    lora: LoraSettings = LoraSettings()
    # Start from earlier tuned weights (RPO §4.1: from DPO-SD1.5; rounds: round k starts from round
    # k-1): a finetune output folder of the same mode (or a LoRA file/folder, a UNet folder).
    init_from: str | None = None
    # The frozen DPO reference: `base` (the `model`), or `init` (the weights at `init_from`, as the
    # reference code loads its reference from --unet_init; `previous` says the same in rounds, where the
    # init is the previous round). Unset: `init` when init_from is set, else `base`. With `init` the
    # first step starts at loss log 2 and implicit accuracy 0.5 (model = reference).
    reference: Literal["base", "init", "previous"] | None = None

    data: list[PairSourceConfig] = Field(default_factory=list)
    resolution: int = Field(512, ge=8)
    random_crop: bool = False
    hflip: bool = True  # one flip decision per pair: both images flip together
    proportion_empty_prompts: float = Field(0.0, ge=0, le=1)

    # edit_region: the per-latent-pixel MSE weighted by the pair's `edit_mask` (resized to the latent
    # grid), `mask_floor` outside it (0: the unchanged region is ignored).
    loss_mask: Literal["none", "edit_region"] = "none"
    mask_floor: float = Field(0.1, ge=0, le=1)
    # Held-out pairs (a fixed fraction of each source, never trained on): implicit accuracy and reward
    # margin every `eval_every` steps in metrics.jsonl.
    heldout_fraction: float = Field(0.0, ge=0, lt=1)
    heldout_max_pairs: int = Field(64, ge=1)
    heldout_draws: int = Field(2, ge=1)  # (noise, σ) draws per held-out pair, fixed for the run
    eval_every: int = Field(50, ge=1)

    beta: float = Field(5000.0, gt=0)
    learning_rate: float = Field(1e-8, gt=0)
    scale_lr: bool = True  # lr × gradient_accumulation_steps × train_batch_size × num_processes
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = Field(500, ge=0)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    adam_beta1: float = Field(0.9, ge=0, lt=1)  # AdamW's own bounds, checked before the launch
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)

    train_batch_size: int = Field(1, ge=1)  # pairs per process per micro-step
    gradient_accumulation_steps: int = Field(1, ge=1)
    effective_batch_size: int | None = Field(None, ge=1)  # pairs per optimizer step; sets the accumulation
    max_train_steps: int = Field(2000, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    # Shard the model with FSDP (accelerate launch --use_fsdp): needed for a full fine-tune of a 12B+
    # transformer (FLUX.1, Qwen-Image), together with gradient_checkpointing.
    fsdp: bool = False
    seed: int = 0

    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(3, ge=1)  # keep the last M checkpoints
    vae_encode_batch_size: int = Field(8, ge=1)
    dataloader_num_workers: int = Field(0, ge=0)
    log_every: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _reference_needs_init(self) -> "FinetuneConfig":
        if self.reference in ("init", "previous") and not self.init_from:
            raise ValueError(f"reference: {self.reference} needs init_from (the tuned weights to start from); "
                             "or set reference: base")
        if self.reference is None:  # resolved here, so the recorded config and its hash say which
            self.reference = "init" if self.init_from else "base"
        elif self.reference == "previous":
            self.reference = "init"
        return self

    @property
    def is_flow(self) -> bool:
        return self.flow is not None or self.arch in FLOW_ARCHS

    @model_validator(mode="after")
    def _flow_consistent(self) -> "FinetuneConfig":
        if self.arch in ("sd15", "sdxl") and self.flow is not None:
            raise ValueError(f"arch {self.arch} is a UNet (Diffusion-DPO) but the config has a `flow` section "
                             "(Flow-DPO): remove `flow`, or set arch to sd3, flux or qwen_image")
        return self

    @field_validator("data")
    @classmethod
    def _names_unique(cls, v: list[PairSourceConfig]) -> list[PairSourceConfig]:
        names = [s.name for s in v if s.name]
        if len(names) != len(set(names)):
            raise ValueError(f"data source names must be unique, got {names}")
        return v

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-steps per optimizer step: from `effective_batch_size` when set, else as given."""
        if self.effective_batch_size is None:
            return self.gradient_accumulation_steps
        per_step = self.train_batch_size * num_processes
        if self.effective_batch_size % per_step:
            raise ValueError(
                f"effective_batch_size {self.effective_batch_size} is not a multiple of train_batch_size × processes "
                f"= {self.train_batch_size} × {num_processes}; change one of them"
            )
        return self.effective_batch_size // per_step

    def learning_rate_for(self, num_processes: int) -> float:
        if not self.scale_lr:
            return self.learning_rate
        return self.learning_rate * self.accumulation_steps(num_processes) * self.train_batch_size * num_processes


# Fields that change what is learned: a checkpoint made under other values is not resumed.
# Left out: how long to train, how often to save and log, batching of the frozen encoders, the
# number of data workers, precision and checkpointing (numerics, not the objective).
_RUNTIME_FIELDS = {
    "name", "models_root", "max_train_steps", "checkpointing_steps", "checkpoints_total_limit",
    "vae_encode_batch_size", "dataloader_num_workers", "log_every", "mixed_precision", "gradient_checkpointing",
    "fsdp", "heldout_max_pairs", "heldout_draws", "eval_every", "text_cache_dir",
}


# Options added later, left out of the hash at their defaults: configs made before them keep their hash
# (and their checkpoints resume).
_LATER_DEFAULTS = {"flow": None, "loss_mask": "none", "mask_floor": 0.1, "heldout_fraction": 0.0}


def learning_settings(cfg: FinetuneConfig) -> dict:
    """The config's values that change what is learned (all but the runtime fields)."""
    return cfg.model_dump(mode="json", exclude=_RUNTIME_FIELDS)


def finetune_config_hash(cfg: FinetuneConfig) -> str:
    data = learning_settings(cfg)
    for key, default in _LATER_DEFAULTS.items():
        if data.get(key) == default:
            data.pop(key)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class EvalModelConfig(_Strict):
    """A model to evaluate: a diffusers pipeline (Hub id or dir) or a finetune output folder."""

    name: str
    path: str
    lora: str | None = None  # a LoRA over `path` (file, folder with pytorch_lora_weights.safetensors, finetune output)

    @field_validator("name")
    @classmethod
    def _column_safe(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"model name {v!r}: use letters, digits, '-', '_' or '.' (it names files and rows)")
        return v


class EvaluateConfig(_Strict):
    """Images from every model for the same prompts and seeds, scored by the reward registry."""

    name: str = "evaluate"
    models_root: str | None = None
    prompts: SourceConfig = SourceConfig(kind="prompts", path="richpref/data/demo_prompts.txt")
    models: list[EvalModelConfig]  # the first one is the baseline of the win rates
    rewards: dict[str, RewardSpec]
    images_per_prompt: int = Field(1, ge=1)
    seed: int = 0  # image k of prompt i uses seed + i * images_per_prompt + k, for every model
    steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    height: int = Field(512, ge=8)
    width: int = Field(512, ge=8)
    scheduler: str | None = None
    safety_checker: bool = False  # keep the checkpoint's safety checker (flagged images come out black)
    # Prompt tokens of the T5 / Qwen2.5-VL encoders of flow-matching models (None: the pipeline's default).
    max_sequence_length: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    grid_prompts: int = Field(8, ge=0)  # rows of the side-by-side grid PNG
    grid_cell: int = Field(256, ge=16)  # side of one grid cell in pixels

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[EvalModelConfig]) -> list[EvalModelConfig]:
        names = [m.name for m in v]
        if not v:
            raise ValueError("evaluate.models is empty: name at least one model (base first)")
        if len(names) != len(set(names)):
            raise ValueError(f"model names must be unique, got {names}")
        return v

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, v: dict[str, RewardSpec]) -> dict[str, RewardSpec]:
        if not v:
            raise ValueError("evaluate.rewards is empty: name at least one reward")
        for name in v:
            if not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
                raise ValueError(f"reward name {name!r}: use lowercase letters, digits and '_' (it names columns)")
        return v


def _load_yaml(name_or_path: str, overrides: list[str] | None, models_root: str | None = None,
               kind: str = "finetune") -> tuple[dict, str]:
    """The config's YAML; `extends: <config>` starts from another config, each key it names replacing
    the base's whole value (as profiles do). `models_root` (the command's --models-root), else
    RICHPREF_MODELS_ROOT, replaces the config's `models_root`, as for curate profiles."""
    path = find_profile(name_or_path, kind)
    return apply_models_root(apply_overrides(read_profile_data(path), overrides), models_root), str(path)


def load_finetune_config(name_or_path: str, overrides: list[str] | None = None,
                         models_root: str | None = None) -> FinetuneConfig:
    """`configs/<name>.yaml` (e.g. finetune-tiny) or a YAML path, with `key=value` overrides."""
    data, path = _load_yaml(name_or_path, overrides, models_root)
    try:
        return FinetuneConfig.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(invalid_message("finetune config", path, exc, FinetuneConfig, overrides)) from exc


def load_evaluate_config(name_or_path: str, overrides: list[str] | None = None,
                         models_root: str | None = None) -> EvaluateConfig:
    data, path = _load_yaml(name_or_path, overrides, models_root, "evaluate")
    try:
        return EvaluateConfig.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(invalid_message("evaluate config", path, exc, EvaluateConfig, overrides)) from exc
