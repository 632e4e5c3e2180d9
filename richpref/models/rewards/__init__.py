"""Reward models behind two small interfaces, a registry keyed by kind, and z-scores.

`load_reward(kind, path, **options)` builds a scorer from resolved local paths (or Hub ids);
`load_reward_spec(spec, models_root)` does it from a profile's `RewardSpec`, resolving every model
reference the spec names. Each kind loads the original checkpoint layout of its reference and is
tested on tiny weights in that layout (`richpref.models.tiny.rewards`).

| kind | module | per image or pair |
|---|---|---|
| clip, pickscore, ict, hp, aesthetic | `clip` | image |
| imagereward | `imagereward` | image |
| hpsv2 | `hps` | image |
| dino_patch | `dino` | pair (edit vs original) |
| vlm_score | `vlm_score` | image |
| unified_reward | `unified_reward` | image (generative judge) |
| edit_score | `edit_score` | edit: (original, instruction, edited) (generative judge) |
| hpsv3 | `hpsv3` (+ `qwen_head`; served: `served_head`) | image |
| edit_reward | `edit_reward` (+ `qwen_head`; served: `served_head`) | pair (original, instruction, edit) |
"""
from __future__ import annotations

from typing import Any, Callable

from .base import (LinearHead, PairReward, Reward, RewardLoadError, checkpoint_file, is_pairwise, load_state_dict,
                   zscore)
from .clip import AestheticScore, CLIPSimilarity, HPScore, ICTScore


def _clip(path, **kw):
    return CLIPSimilarity(path, scaled=False, **kw)


def _pickscore(path, **kw):
    return CLIPSimilarity(path, scaled=True, **kw)


def _imagereward(path, **kw):
    from .imagereward import ImageReward

    return ImageReward(path, **kw)


def _hpsv2(path, **kw):
    from .hps import HPSv2

    return HPSv2(path, **kw)


def _dino_patch(path, **kw):
    from .dino import DinoPatchConsistency

    return DinoPatchConsistency(path, **kw)


def _vlm_score(path, **kw):
    from .vlm_score import VLMExpectedScore

    return VLMExpectedScore(path, **kw)


def _unified_reward(path, **kw):
    from .unified_reward import UnifiedReward

    return UnifiedReward(path, **kw)


def _edit_score(path, **kw):
    from .edit_score import EditScore

    return EditScore(path, **kw)


def _served_head(kind: str, path: str, engine, kw: dict):
    """A head judge through richpref's judge server (engine.backend: server), else None."""
    if engine is None or engine.backend != "server":
        return None
    from .served_head import SERVED

    return SERVED[kind](path, engine=engine, **kw)


def _hpsv3(path, engine=None, **kw):
    from .hpsv3 import HPSv3

    return _served_head("hpsv3", path, engine, kw) or HPSv3(path, **kw)


def _edit_reward(path, engine=None, **kw):
    from .edit_reward import EditReward

    return _served_head("edit_reward", path, engine, kw) or EditReward(path, **kw)


# kind -> (loader, the spec options it takes besides device/dtype)
REGISTRY: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "clip": (_clip, ("processor",)),
    "pickscore": (_pickscore, ("processor",)),
    "imagereward": (_imagereward, ("processor", "file")),
    "hpsv2": (_hpsv2, ("file", "version")),
    "aesthetic": (lambda path, **kw: AestheticScore(path, **kw), ("backbone", "file")),
    "ict": (lambda path, **kw: ICTScore(path, **kw), ("backbone", "processor", "file")),
    "hp": (lambda path, **kw: HPScore(path, **kw), ("backbone", "processor", "file")),
    "dino_patch": (_dino_patch, ("patch", "stride")),
    "vlm_score": (_vlm_score, ("template", "engine")),
    "unified_reward": (_unified_reward, ("template", "engine", "max_new_tokens")),
    "edit_score": (_edit_score, ("adapter", "template", "engine", "max_new_tokens")),
    "hpsv3": (_hpsv3, ("backbone", "file", "template", "engine")),
    "edit_reward": (_edit_reward, ("backbone", "file", "template", "quality_template", "engine")),
}
KINDS = tuple(REGISTRY)
PAIR_KINDS = ("dino_patch", "edit_reward")
MODEL_REF_OPTIONS = ("processor", "backbone", "adapter")  # options that name models (resolved like `model`)


def load_reward(kind: str, path: str, *, device: str = "auto", dtype: str = "auto", **options: Any):
    """A scorer of `kind` from `path` (local path or Hub id). Options a kind does not take are errors."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown reward kind {kind!r}; known: {', '.join(KINDS)}")
    loader, allowed = REGISTRY[kind]
    extra = sorted(k for k, v in options.items() if v is not None and k not in allowed)
    if extra:
        raise ValueError(f"reward kind {kind!r} takes no option(s) {extra}; it takes {list(allowed) or 'none'}")
    return loader(path, device=device, dtype=dtype, **{k: v for k, v in options.items() if v is not None})


def load_reward_spec(spec, models_root: str | None = None, *, device: str = "auto", dtype: str = "auto"):
    """A scorer from a profile's `RewardSpec`: `model`, `processor` and `backbone` resolve like every
    model reference (local dir under models_root, or a Hub id; offline misses fail at once)."""
    from ..runtime import ModelNotAvailable, resolve_model_ref

    def resolve(ref: str) -> str:
        try:
            return resolve_model_ref(ref, models_root)
        except ModelNotAvailable:
            if spec.engine.endpoint:  # a server someone runs holds the weights, not this machine
                return ref
            raise

    _, allowed = REGISTRY[spec.kind]
    options = {k: getattr(spec, k) for k in allowed}
    for k in MODEL_REF_OPTIONS:
        if options.get(k) is not None:
            options[k] = resolve(options[k])
    return load_reward(spec.kind, resolve(spec.model), device=device, dtype=dtype, **options)


__all__ = ["KINDS", "PAIR_KINDS", "REGISTRY", "AestheticScore", "CLIPSimilarity", "HPScore", "ICTScore", "LinearHead",
           "PairReward", "Reward", "RewardLoadError", "checkpoint_file", "is_pairwise", "load_reward",
           "load_reward_spec", "load_state_dict", "zscore"]
