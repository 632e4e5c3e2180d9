"""Memory a DPO run's trained model needs per device, from the checkpoint's safetensors headers (no
weights loaded): `richpref doctor --finetune CONFIG`.

Counted: the denoiser's weights in the training precision; LoRA weights, their gradients and AdamW
states in float32; for a full fine-tune the float32 trainable weights, gradients and AdamW's two states,
sharded over the processes under FSDP, and the frozen reference copy (whole on every device: accelerate
does not prepare it). A UNet run keeps its text encoders on the device (listed apart); a Flow-DPO run
encodes its captions before the transformer loads and releases the encoders, so its peak is the larger
of that phase (the encoders' weights as stored: transformers loads them in their own dtype) and training.
Not counted: activations (batch, resolution, gradient checkpointing) and the VAE (small).
"""
from __future__ import annotations

from pathlib import Path

from ..models.runtime import resolve_model_ref
from ..schemas.training import FinetuneConfig
from .flow_models import FLOW_ARCHS, detect_family, lora_targets

GB = 1024**3


def weight_shapes(folder: Path) -> dict[str, list[int]]:
    """Each weight's shape in a model folder's safetensors headers (nothing loaded)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_slice(k).get_shape() for k in st.keys()})
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def estimate_memory(cfg: FinetuneConfig, num_processes: int = 1) -> dict:
    model_dir = resolve_model_ref(cfg.model, cfg.models_root)
    arch = detect_family(model_dir)
    sub = "transformer" if arch in FLOW_ARCHS else "unet"
    shapes = weight_shapes(Path(model_dir) / sub)
    n = sum(_numel(s) for s in shapes.values())
    wbytes = 2 if cfg.mixed_precision in ("fp16", "bf16") else 4
    targets = lora_targets(arch, cfg.lora.target_modules)
    est = {"arch": arch, "params": n, "weights_gb": n * wbytes / GB}
    if cfg.mode == "lora":
        lora = sum(cfg.lora.rank * (s[0] + s[1]) for k, s in shapes.items()
                   if len(s) == 2 and any(k.endswith(f"{t}.weight") for t in targets))
        est.update(trainable=lora, training_state_gb=lora * 16 / GB, reference_gb=0.0)
    else:
        shard = num_processes if cfg.fsdp else 1
        # The frozen reference is not prepared by accelerate: a whole copy on every device, also under FSDP.
        est.update(trainable=n, training_state_gb=n * 16 / GB / shard, reference_gb=n * wbytes / GB)
        est["weights_gb"] /= shard
    encoders = sorted(Path(model_dir).glob("text_encoder*"))
    if arch in FLOW_ARCHS:
        est["text_encoders_gb"] = 0.0
        est["text_encoding_gb"] = sum(f.stat().st_size for d in encoders for f in d.glob("*.safetensors")) / GB
    else:
        est["text_encoders_gb"] = sum(_numel(s) for d in encoders for s in weight_shapes(d).values()) * wbytes / GB
        est["text_encoding_gb"] = 0.0
    est["training_gb"] = est["weights_gb"] + est["training_state_gb"] + est["reference_gb"] + est["text_encoders_gb"]
    est["total_gb"] = max(est["training_gb"], est["text_encoding_gb"])
    return est


def format_estimate(cfg: FinetuneConfig, est: dict, num_processes: int) -> str:
    return (f"finetune {cfg.name}: {est['arch']} {cfg.mode}, {est['params'] / 1e9:.3g}B parameters, "
            f"{est['trainable'] / 1e6:.3g}M trained, mixed precision {cfg.mixed_precision}, "
            f"{'FSDP over ' + str(num_processes) + ' processes, ' if cfg.fsdp else ''}per device: weights "
            f"{est['weights_gb']:.3g} GB + trained weights/grads/AdamW {est['training_state_gb']:.3g} GB + reference "
            f"{est['reference_gb']:.3g} GB + text encoders {est['text_encoders_gb']:.3g} GB = {est['training_gb']:.3g} GB "
            "before activations"
            + (f"; caption encoding, before the transformer loads: {est['text_encoding_gb']:.3g} GB"
               if est["text_encoding_gb"] else ""))
