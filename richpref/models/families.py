"""Text-to-image model families: which one a checkpoint is, and how each is called.

The family is read from the checkpoint, never assumed: the pipeline class in model_index.json (or of a
loaded pipeline) and, for FLUX.1, whether its transformer has the guidance embedding of the distilled
[dev] models. Each family takes its own arguments (`call_kwargs`):

- sd15 / sdxl (UNet, epsilon/v-prediction): classifier-free guidance `guidance_scale`, negative prompt.
- sd3 (StableDiffusion3Pipeline, SD3/SD3.5): true CFG `guidance_scale` with a negative prompt; T5
  sequence of `max_sequence_length` tokens.
- flux_dev (FluxPipeline, guidance-distilled FLUX.1 [dev]): `guidance_scale` is the distilled guidance
  fed to the guidance embedding; no true CFG (one transformer pass per step), no negative prompt.
- flux_schnell (FluxPipeline without guidance embedding, FLUX.1 [schnell]): no guidance at all.
- qwen_image (QwenImagePipeline): true CFG `true_cfg_scale`, on only with a negative prompt (" " when
  none is given, as the model card does).

Image sides must be multiples of `size_multiple(family)`: the VAE's ×8 times the transformer's 2×2 patch
for the flow-matching families.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("richpref")

# Pipeline class -> family (FluxPipeline splits into flux_dev / flux_schnell by its transformer).
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "QwenImagePipeline": "qwen_image",
}
# The denoiser each family's pipeline holds (folder name, class): what doctor checks offline.
DENOISERS = {
    "sd15": ("unet", "UNet2DConditionModel"),
    "sdxl": ("unet", "UNet2DConditionModel"),
    "sd3": ("transformer", "SD3Transformer2DModel"),
    "flux_dev": ("transformer", "FluxTransformer2DModel"),
    "flux_schnell": ("transformer", "FluxTransformer2DModel"),
    "qwen_image": ("transformer", "QwenImageTransformer2DModel"),
}
FLOW_FAMILIES = frozenset({"sd3", "flux_dev", "flux_schnell", "qwen_image"})
# Longest prompt token sequence each flow family's text encoder takes (the pipelines refuse more).
MAX_SEQUENCE_LENGTH = {"sd3": 512, "flux_dev": 512, "flux_schnell": 256, "qwen_image": 1024}


class UnknownPipeline(ValueError):
    pass


def _unknown(what: str, class_name: str | None) -> UnknownPipeline:
    known = ", ".join(PIPELINE_FAMILIES)
    return UnknownPipeline(f"{what}: a {class_name or 'pipeline without a class name'}, which richpref cannot "
                           f"generate with; give a checkpoint of one of {known}")


def family_of(pipeline_class: str | None, guidance_embeds: bool | None = None, what: str = "model") -> str:
    """The family of a pipeline class name (and, for FLUX.1, of its transformer's guidance embedding)."""
    family = PIPELINE_FAMILIES.get(pipeline_class or "")
    if family is None:
        raise _unknown(what, pipeline_class)
    if family == "flux":
        return "flux_dev" if guidance_embeds else "flux_schnell"
    return family


def detect_pipeline_family(pipe: Any, what: str = "model") -> str:
    """The family of a loaded diffusers pipeline (its class, its transformer's config)."""
    transformer = getattr(pipe, "transformer", None)
    guidance = bool(getattr(getattr(transformer, "config", None), "guidance_embeds", False))
    return family_of(type(pipe).__name__, guidance, what)


def read_model_index(path: str | Path) -> dict:
    """model_index.json of a local pipeline folder (FileNotFoundError naming it when absent)."""
    p = Path(path) / "model_index.json"
    if not p.exists():
        raise FileNotFoundError(f"{path}: no model_index.json, so not a diffusers pipeline folder; give a "
                                "folder saved by save_pretrained or a Hub id in the cache")
    return json.loads(p.read_text())


def detect_checkpoint_family(path: str | Path) -> str:
    """The family of a local pipeline folder, from its files alone (nothing loaded)."""
    index = read_model_index(path)
    cls = index.get("_class_name")
    guidance = None
    if PIPELINE_FAMILIES.get(cls or "") == "flux":
        cfg = Path(path) / "transformer" / "config.json"
        guidance = bool(json.loads(cfg.read_text()).get("guidance_embeds")) if cfg.exists() else None
    return family_of(cls, guidance, str(path))


def size_multiple(family: str, vae_scale_factor: int = 8) -> int:
    """What image sides must be a multiple of: the VAE's factor, times 2 for the patchified transformers."""
    return vae_scale_factor * (2 if family in FLOW_FAMILIES else 1)


def round_size(side: int, multiple: int) -> int:
    """`side` rounded to the nearest multiple of `multiple` (at least one multiple)."""
    return max(multiple, int(round(side / multiple)) * multiple)


def base_family(family: str) -> str:
    """The family a LoRA or a fine-tune is made for: FLUX.1 [dev] and [schnell] share one transformer."""
    return "flux" if family in ("flux_dev", "flux_schnell") else family


def check_sequence_length(family: str, tokens: int | None, setting: str = "max_sequence_length") -> None:
    """ValueError naming `setting` when a flow family's pipeline takes fewer prompt tokens than `tokens`
    (the UNet families have no such setting: CLIP's 77 tokens)."""
    limit = MAX_SEQUENCE_LENGTH.get(family)
    if tokens is not None and limit is not None and tokens > limit:
        raise ValueError(f"{setting} {tokens}: {family} models take at most {limit} prompt tokens; set it to "
                         f"{limit} or less")


def call_kwargs(family: str, *, guidance_scale: float, n: int, negative_prompt: str | None = None,
                max_sequence_length: int | None = None) -> dict[str, Any]:
    """The guidance, negative-prompt and sequence-length arguments of one pipeline call of `n` prompts."""
    negatives = [negative_prompt] * n if negative_prompt is not None else None
    if family in ("sd15", "sdxl"):
        return {"guidance_scale": guidance_scale, "negative_prompt": negatives}
    out: dict[str, Any] = {}
    if max_sequence_length is not None:
        check_sequence_length(family, max_sequence_length)
        out["max_sequence_length"] = max_sequence_length
    if family == "sd3":
        out.update(guidance_scale=guidance_scale, negative_prompt=negatives)
    elif family == "flux_dev":
        # Distilled guidance through the guidance embedding; true_cfg_scale 1 = no second pass.
        out.update(guidance_scale=guidance_scale, true_cfg_scale=1.0)
    elif family == "flux_schnell":
        out.update(true_cfg_scale=1.0)
    elif family == "qwen_image":
        out.update(true_cfg_scale=guidance_scale,
                   negative_prompt=negatives if negatives is not None else [" "] * n)
    else:
        raise _unknown("model", family)
    return out
