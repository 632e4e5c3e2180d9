"""Reward models behind two small interfaces, a registry keyed by kind, and z-scores.

Each kind is declared once, in richpref/schemas/rewards/ (options, defaults, loader, tiny twin); the
registry here is read from those declarations.

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

import importlib
from typing import Any, Callable

from ...schemas.rewards import REWARD_KINDS

# Imported at their first use (PEP 562): the scorer classes need torch, and a command that plans or
# inspects a run (its stages import this package) never scores.
_LAZY = {**dict.fromkeys(("LinearHead", "PairReward", "Reward", "RewardLoadError", "checkpoint_file", "load_state_dict",
                          "zscore"), "base"),
         **dict.fromkeys(("AestheticScore", "CLIPSimilarity", "HPScore", "ICTScore"), "clip")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_pairwise(scorer: object) -> bool:
    """Whether a scorer judges an (original, edit) pair rather than one image."""
    return bool(getattr(scorer, "pairwise", False))


def _loader(kind: str) -> Callable[..., Any]:
    """The kind's declared loader (richpref/schemas/rewards/), its module imported at the first call."""
    decl = REWARD_KINDS[kind]
    module, attr = decl.loader.split(":")

    def load(path, **kw):
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)(path, **decl.fixed, **kw)

    return load


# kind -> (loader, the spec options it takes besides device/dtype): from the kinds' declarations.
REGISTRY: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {k: (_loader(k), d.options) for k, d in REWARD_KINDS.items()}
KINDS = tuple(REGISTRY)
PAIR_KINDS = tuple(k for k, d in REWARD_KINDS.items() if d.pairwise)
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
            if spec.engine.weights_elsewhere:
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
