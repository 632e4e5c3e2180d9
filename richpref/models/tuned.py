"""Tuned weights over a base text-to-image pipeline: a LoRA (UNet or flow-matching transformer) or a full UNet, as `richpref finetune`
writes them (a finetune output folder holds them in `final/`) or as any diffusers tool saves them.

Used by the sample stage (`sample.lora`, `sample.unet`: RPO rounds sample from the last round's
model). `weights_fingerprint` hashes the weight files' bytes, so new weights at the same path are a
new stage key.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
FINETUNE_META = "finetune.json"


class TunedWeightsError(FileNotFoundError):
    pass


class _NoTextEncoderKeysNote(logging.Filter):
    """diffusers warns, for each text encoder, when a LoRA has no keys for it: a UNet or transformer LoRA
    (every LoRA richpref trains) never has, so the warning would be printed at every load, for nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


def load_lora(pipe, folder: str | os.PathLike, weight_name: str = LORA_WEIGHTS) -> None:
    """`pipe.load_lora_weights` without diffusers' note that the LoRA has no text-encoder keys; a LoRA
    none of whose weights fit the pipeline's UNet or transformer (made for another base: diffusers
    then loads nothing and only logs it) is a TunedWeightsError, not an untuned model under its name."""
    denoiser = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    before = set(pipe.get_list_adapters().get(denoiser, []))
    note = logging.getLogger("diffusers.loaders.lora_base")
    quiet = _NoTextEncoderKeysNote()
    note.addFilter(quiet)
    try:
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
    finally:
        note.removeFilter(quiet)
    if not set(pipe.get_list_adapters().get(denoiser, [])) - before:
        model = type(getattr(pipe, denoiser)).__name__
        raise TunedWeightsError(f"LoRA weights {Path(folder) / weight_name}: none of its weights fit this pipeline's "
                                f"{denoiser} ({model}), so it was trained on another base model; give a LoRA of this "
                                "model (or sample with the model it was trained on)")


def _final(path: Path) -> Path:
    """A finetune output folder's `final/`, else the path itself."""
    return path / "final" if (path / "final" / FINETUNE_META).exists() else path


def tuned_meta(path: str | os.PathLike) -> dict | None:
    """The finetune.json of tuned weights' finetune output (the folder, its final/, or the final/ a weights
    file lies in); None for weights without one (a LoRA file or folder from elsewhere)."""
    p = Path(path)
    meta = p.parent / FINETUNE_META if p.is_file() else _final(p) / FINETUNE_META
    try:
        return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else None
    except (OSError, ValueError):
        return None


def tuned_arch(path: str | os.PathLike) -> str | None:
    """The family (sd15, sdxl, sd3, flux, qwen_image) tuned weights were trained on (their finetune.json)."""
    return (tuned_meta(path) or {}).get("arch")


def lora_ranks(path: str | os.PathLike) -> list[int]:
    """The ranks of a LoRA file's down projections, read from its safetensors header (no tensor loaded)."""
    from safetensors import safe_open

    with safe_open(str(lora_file(path)), "pt") as f:
        return sorted({f.get_slice(k).get_shape()[0] for k in f.keys()
                       if k.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight"))})


def tuned_elsewhere(path: str | os.PathLike, family: str) -> str | None:
    """Why weights at `path` (a finetune output) cannot go into a model of `family` (sd15, flux_dev, …):
    they were tuned on another family's model; None when they fit or say nothing of their base."""
    from .families import base_family

    arch = tuned_arch(path)
    if arch and arch != base_family(family):
        return f"{path} was tuned on a {arch} model, and this is a {family} checkpoint"
    return None


def lora_file(path: str | os.PathLike) -> Path:
    """The LoRA safetensors file of a file, a folder holding pytorch_lora_weights.safetensors, or a
    finetune output folder."""
    p = Path(path)
    if p.is_file():
        return p
    cand = _final(p) / LORA_WEIGHTS
    if not cand.exists():
        raise TunedWeightsError(f"LoRA weights {path}: no {LORA_WEIGHTS} there (or in its final/); give the "
                                "file, its folder, or a LoRA finetune output folder")
    return cand


def flow_transformer_dir(path: str | os.PathLike) -> Path | None:
    """The transformer folder of a full Flow-DPO output (its final/transformer/), else None."""
    d = _final(Path(path)) / "transformer"
    return d if (d / "config.json").is_file() else None


def unet_dir(path: str | os.PathLike) -> Path:
    """A diffusers UNet folder (config.json + weights): the path, its `unet/`, or a finetune output's."""
    p = _final(Path(path))
    for cand in (p, p / "unet"):
        if (cand / "config.json").exists():
            return cand
    if flow_transformer_dir(p) is not None:
        raise TunedWeightsError(f"UNet weights {path}: a full fine-tune of a flow-matching transformer "
                                "(final/transformer/), not a UNet; a flow-matching model samples and continues "
                                "from tuned weights as a LoRA (sample.lora, init_from with mode: lora)")
    raise TunedWeightsError(f"UNet weights {path}: no diffusers UNet folder (config.json) there, in unet/ or in "
                            "final/unet/; give a full finetune output folder or a saved UNet")


@functools.lru_cache(maxsize=32)
def _files_digest(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for name, _size, _mtime in files:
        h.update(Path(name).name.encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _fingerprint(files: list[Path]) -> str:
    return _files_digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def _folder_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file())


def weights_fingerprint(lora: str | None = None, unet: str | None = None) -> str:
    """sha256 of the tuned weights' bytes ("" without any): read once per file version."""
    if lora:
        return _fingerprint([lora_file(lora)])
    if unet:
        return _fingerprint(_folder_files(unet_dir(unet)))
    return ""


def tuned_fingerprint(path: str | os.PathLike) -> str:
    """weights_fingerprint of the tuned weights at `path`, a LoRA, a full UNet (a file, its folder, or a
    finetune output folder) or the transformer of a full Flow-DPO output; TunedWeightsError when it
    holds none of them."""
    try:
        return weights_fingerprint(lora=str(path))
    except TunedWeightsError:
        transformer = flow_transformer_dir(path)
        if transformer is not None:
            return _fingerprint(_folder_files(transformer))
        return weights_fingerprint(unet=str(path))


def apply_tuned(t2i, lora: str | None = None, unet: str | None = None) -> None:
    """Put the tuned weights into a loaded `TextToImage` (LoRA loaded into its pipeline; UNet swapped)."""
    if lora:
        f = lora_file(lora)
        load_lora(t2i.pipe, f.parent, f.name)
        t2i.model_id = f"{t2i.model_id}+lora:{f}"
    elif unet:
        from diffusers import UNet2DConditionModel

        from .families import FLOW_FAMILIES
        from .generator import diffusers_dtype_kwargs

        if t2i.family in FLOW_FAMILIES:
            raise TunedWeightsError(f"UNet weights {unet}: {t2i.model_id} is a {t2i.family} flow-matching transformer, "
                                    "not a UNet; give its tuned LoRA instead (sample.lora)")
        d = unet_dir(unet)
        t2i.pipe.unet = UNet2DConditionModel.from_pretrained(d, **diffusers_dtype_kwargs(t2i.dtype)).to(t2i.device)
        t2i.model_id = f"{t2i.model_id}+unet:{d}"
