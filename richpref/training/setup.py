"""Before a DPO run trains: checks that refuse a config the checkpoint or the data cannot serve
(`preflight`, run by `richpref finetune` before Prefect starts and again by the training process),
and the model side of a run (`setup_model`): UNet or flow transformer, LoRA or full, the reference.
"""
from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.families import check_sequence_length, detect_checkpoint_family, size_multiple
from ..models.runtime import resolve_model_ref
from ..schemas.training import FinetuneConfig, FlowSettings
from .checkpoints import TrainingError, load_init_lora, load_init_unet
from ..sources.base import SourceError
from ..sources.parquet import footer
from .data import MASK_COLUMN, PAIR_COLUMNS, DataError, check_has_pairs, pair_files
from .flow_models import FLOW_ARCHS, ArchMismatch, check_arch, load_flow_parts, lora_targets
from .memory import weight_shapes
from .models import add_lora, frozen_copy, load_parts

log = logging.getLogger("richpref")

BIG_TRANSFORMER = 12e9  # parameters: FLUX.1 (12B), Qwen-Image (20B)


def transformer_params(model_dir: str) -> int:
    """Parameter count of a pipeline's transformer, from its safetensors headers (nothing loaded)."""
    return sum(math.prod(shape) for shape in weight_shapes(Path(model_dir) / "transformer").values())


def check_lora_targets(cfg: FinetuneConfig, model_dir: str, family: str) -> None:
    """Each LoRA target names a module of the trained network (PEFT's rule: the module's name, or its
    dotted tail), read from the safetensors headers; before, a launch failed on it after the models loaded."""
    sub = "transformer" if family in FLOW_ARCHS else "unet"
    modules = {k.rsplit(".", 1)[0] for k in weight_shapes(Path(model_dir) / sub)}
    if not modules:  # weights without safetensors headers: PEFT names a missing target when it loads them
        return
    missing = [t for t in lora_targets(family, cfg.lora.target_modules)
               if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        raise ArchMismatch(f"lora.target_modules {missing}: no module of the {sub} of {cfg.model!r} ends with that name; "
                           "name its attention projections (e.g. to_q, to_k, to_v, to_out.0) or drop lora.target_modules "
                           "for the family's default")


def check_init_from(cfg: FinetuneConfig, path: str, family: str) -> None:
    """init_from made for this base and holding what `mode` continues (a LoRA, or a full UNet): before,
    another mode's weights failed each launch of the trainer after the models loaded."""
    from ..models.tuned import TunedWeightsError, lora_file, tuned_arch, unet_dir

    other = tuned_arch(path)
    if other and other != family:
        raise ArchMismatch(f"init_from {cfg.init_from}: made for a {other} model, this run trains {cfg.model!r} "
                           f"({family}); give weights trained on the same base, or drop init_from")
    if cfg.mode == "full" and family in FLOW_ARCHS:
        raise ArchMismatch(f"init_from {cfg.init_from} with mode: full: Flow-DPO continues LoRA runs only; use mode: lora")
    try:
        lora_file(path) if cfg.mode == "lora" else unet_dir(path)
    except TunedWeightsError as exc:
        raise ArchMismatch(f"init_from {cfg.init_from} (mode: {cfg.mode}): {exc}") from None
    differ = lora_differences(cfg, path) if cfg.mode == "lora" else []
    if differ:  # before: a size-mismatch traceback in the trainer, at each of its launches
        raise ArchMismatch(f"init_from {cfg.init_from}: its LoRA was trained with {'; '.join(differ)}: continue it with "
                           "the lora: settings it was trained with, or drop init_from")


def lora_differences(cfg: FinetuneConfig, path: str) -> list[str]:
    """How the LoRA at `path` differs from `cfg.lora`: its rank (from its weights), its alpha and target
    modules (from its finetune.json, where it has one)."""
    from ..models.tuned import lora_ranks, tuned_meta

    try:
        out, ranks = [], lora_ranks(path)
    except Exception as exc:  # noqa: BLE001 - safetensors has its own errors for a file that is not one
        raise ArchMismatch(f"init_from {cfg.init_from}: its LoRA weights cannot be read ({type(exc).__name__}: "
                           f"{exc}); give a LoRA safetensors file, or drop init_from") from None
    if ranks and ranks != [cfg.lora.rank]:
        out.append(f"rank {'/'.join(map(str, ranks))} (lora.rank is {cfg.lora.rank})")
    then = ((tuned_meta(path) or {}).get("config") or {}).get("lora")
    if then:
        alpha_then, alpha_now = then.get("alpha") or then.get("rank"), cfg.lora.alpha or cfg.lora.rank
        if alpha_then != alpha_now:  # the adapter's scale, alpha / rank: another start than init_from's model
            out.append(f"alpha {alpha_then:g} (lora.alpha is {alpha_now:g})")
        if sorted(then.get("target_modules") or []) != sorted(cfg.lora.target_modules):
            out.append(f"target_modules {then.get('target_modules')} (lora.target_modules is {cfg.lora.target_modules})")
    return out


def preflight(cfg: FinetuneConfig, *, fsdp: bool | None = None, made_later: frozenset[str] = frozenset()) -> str:
    """The checkpoint's family, after refusing what cannot train: a Flow-DPO config on a UNet (or the
    reverse), init_from made for another base, a 12B+ full fine-tune without FSDP and gradient
    checkpointing, a pairs path with no Parquet file, a pairs file that is no Parquet or lacks the
    Pick-a-Pic columns, edit_region without edit masks (every file's footer read, also at an s3:// URL).
    `made_later`: the names of sources not written yet (a rounds run's own pairs), whose files are not
    read and which may hold the masks. Each message names the input and the fix."""
    model_dir = resolve_model_ref(cfg.model, cfg.models_root)
    family = check_arch(model_dir, cfg.arch, cfg.is_flow, cfg.model)
    if cfg.init_from:
        check_init_from(cfg, resolve_model_ref(cfg.init_from, cfg.models_root), family)
    if cfg.mode == "lora":
        check_lora_targets(cfg, model_dir, family)
    checkpoint = detect_checkpoint_family(model_dir)
    if family in FLOW_ARCHS and cfg.flow is not None:  # the sampler's limit (FLUX.1 [schnell] takes fewer than [dev])
        check_sequence_length(checkpoint, cfg.flow.max_sequence_length, "flow.max_sequence_length")
    multiple = size_multiple(checkpoint)  # the latent grid (and a transformer's 2x2 patches) must tile the crop
    if cfg.resolution % multiple:
        low = max(multiple, cfg.resolution // multiple * multiple)
        raise ValueError(f"resolution {cfg.resolution}: {checkpoint} models take sides in multiples of {multiple}; set "
                         f"it to {low} or {low + multiple}")
    if family in FLOW_ARCHS and cfg.mode == "full":
        n = transformer_params(model_dir)
        on_fsdp = cfg.fsdp if fsdp is None else fsdp
        if n >= BIG_TRANSFORMER and not (on_fsdp and cfg.gradient_checkpointing):
            raise ArchMismatch(
                f"model {cfg.model!r}: a full fine-tune of its {n / 1e9:.1f}B-parameter transformer (plus its "
                "reference) does not fit one device: use mode: lora (the reference is then the same transformer "
                "with adapters off), or set fsdp: true and gradient_checkpointing: true and launch on several GPUs")
    masked = []  # per path source: whether its files hold edit masks
    for src in cfg.data:
        if src.path is None or src.name in made_later:
            continue  # a `datasets` source: checked when loaded; one made later: checked when it is
        files = pair_files(src.path)  # a path with no pairs: refused before Prefect and accelerate start
        with ThreadPoolExecutor(8) as pool:  # one footer read each (a request each on an object store)
            footers = list(pool.map(_pair_footer, files, [src.label] * len(files)))
        check_has_pairs(src.label, src.path, sum(meta.num_rows for meta in footers), len(files))
        with_mask = []
        for f, names in zip(files, (meta.schema.to_arrow_schema().names for meta in footers)):
            missing = [c for c in PAIR_COLUMNS if c not in names]
            if missing:
                raise DataError(f"data source {src.label!r}: {f} lacks column(s) {missing} (has {sorted(names)}); "
                                "training needs Pick-a-Pic columns caption, jpg_0, jpg_1, label_0")
            with_mask.append(MASK_COLUMN in names)
        if cfg.loss_mask == "edit_region" and any(with_mask) and not all(with_mask):  # one source reads as one table
            raise DataError(f"data source {src.label!r}: {files[with_mask.index(False)]} has no {MASK_COLUMN!r} column "
                            f"and {files[with_mask.index(True)]} has one: export the source's pairs again with a "
                            "richpref that writes edit masks (export stage), or give them as two sources")
        masked.append(all(with_mask))
    if cfg.loss_mask == "edit_region" and len(masked) == len(cfg.data) and not any(masked):
        raise DataError(f"loss_mask: edit_region, but no file of data source(s) {[s.label for s in cfg.data]} has an "
                        f"{MASK_COLUMN!r} column: there is no region to weight; export the pairs again with a richpref "
                        "that writes edit masks (export stage), or set loss_mask: none")
    return family


def _pair_footer(path: str, label: str):
    try:
        return footer(path)
    except SourceError as exc:
        raise DataError(f"data source {label!r}: {path} is not a readable Parquet file ({exc.__cause__}); give "
                        "Pick-a-Pic Parquet pairs (a run's pairs/ folder, or `richpref export --format pickapic`)") from exc


@dataclass
class ModelSetup:
    arch: str
    parts: Any  # DiffusionParts (UNet) or FlowParts
    model: Any  # the module trained (UNet or transformer)
    reference: Any  # a frozen module, or None: the same module with adapters off (set after prepare)
    vae_dtype: torch.dtype
    model_dir: str
    flow: FlowSettings | None


def _move(module, device: torch.device, dtype: torch.dtype):
    if any(p.dtype != dtype for p in module.parameters()):
        return module.to(device, dtype=dtype)
    return module.to(device)


def flow_settings(cfg: FinetuneConfig, arch: str) -> FlowSettings | None:
    """A flow-matching run's settings (the defaults where the config has no `flow:` section); None for a UNet."""
    return (cfg.flow or FlowSettings()) if arch in FLOW_ARCHS else None


def setup_model(cfg: FinetuneConfig, device: torch.device, weight_dtype: torch.dtype, fsdp: bool = False,
                arch: str | None = None) -> ModelSetup:
    """`arch`: the family `preflight` returned, when the caller ran it already."""
    model_dir = resolve_model_ref(cfg.model, cfg.models_root)
    vae_dir = resolve_model_ref(cfg.vae, cfg.models_root) if cfg.vae else None
    arch = arch or preflight(cfg, fsdp=fsdp)
    flow = flow_settings(cfg, arch)
    if flow is not None:
        parts = load_flow_parts(model_dir, arch, vae_dir)
        text_encoders = []
    else:
        parts = load_parts(model_dir, arch, vae_dir)
        text_encoders = parts.text_encoders
    model = parts.unet
    if arch == "sdxl" and cfg.mode == "full":
        log.warning("full fine-tuning of SDXL needs a lot of memory; the reference trained SDXL with LoRA")
    for m in (parts.vae, *text_encoders, model):
        m.requires_grad_(False)
    # The SDXL VAE overflows in fp16 (unless a fixed VAE is given): keep it in float32 then; Flow-DPO
    # VAEs run in float32 too (encoding is a small share of a transformer step).
    vae_dtype = torch.float32 if (arch == "sdxl" and vae_dir is None) or flow is not None else weight_dtype
    _move(parts.vae, device, vae_dtype)
    for enc in text_encoders:
        _move(enc, device, weight_dtype)

    torch.manual_seed(cfg.seed)  # LoRA init: the same on every process
    if cfg.mode == "lora":
        _move(model, device, weight_dtype)
        add_lora(model, cfg.lora.model_copy(update={"target_modules": lora_targets(arch, cfg.lora.target_modules)}))
        if cfg.init_from:
            load_init_lora(model, resolve_model_ref(cfg.init_from, cfg.models_root), arch)
        for p in model.parameters():  # trainable weights stay in float32 under mixed precision
            if p.requires_grad:
                p.data = p.data.float()
        reference = _move(frozen_copy(model), device, weight_dtype) if cfg.reference == "init" else None
    else:
        base = frozen_copy(model) if cfg.reference == "base" else None
        if cfg.init_from:
            if flow is not None:
                raise TrainingError("init_from with mode: full is for UNet runs; Flow-DPO continues LoRA runs only")
            load_init_unet(model, resolve_model_ref(cfg.init_from, cfg.models_root))
        reference = _move(base if base is not None else frozen_copy(model), device, weight_dtype)
        model.requires_grad_(True)
        model.to(device)
    model.train()
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return ModelSetup(arch, parts, model, reference, vae_dtype, model_dir, flow)
