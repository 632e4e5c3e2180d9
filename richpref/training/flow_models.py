"""The flow-matching transformers a Flow-DPO run trains (SD3/SD3.5, FLUX.1, Qwen-Image): which family a
pipeline folder holds, loading the transformer and VAE, latents in each family's layout and
normalisation, one transformer call with that family's conditioning, and the LoRA round trip.

The family is read from the folder (model_index.json, the scheduler's and the transformer's classes),
never assumed. Text encoders are not loaded here: text_cache.py encodes every caption once, before
training, with the pipeline's own `encode_prompt`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..schemas.training import FLOW_ARCHS

UNET_ARCHS = ("sd15", "sdxl")
# transformer class -> family, and the text-to-image pipeline whose encode_prompt / save_lora_weights it uses
TRANSFORMER_FAMILY = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
                      "QwenImageTransformer2DModel": "qwen_image"}
PIPELINE = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "qwen_image": "QwenImagePipeline"}
# LoRA targets of diffusers' DreamBooth LoRA scripts (train_dreambooth_lora_sd3.py / _flux.py / _qwen_image.py)
LORA_TARGETS = {
    "sd3": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"],
    "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"],
    "qwen_image": ["to_k", "to_q", "to_v", "to_out.0"],
}
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def lora_targets(arch: str, targets: list[str]) -> list[str]:
    """The modules a LoRA adapts: the config's, where the UNet default on a transformer means its family's."""
    return LORA_TARGETS[arch] if arch in FLOW_ARCHS and list(targets) == UNET_LORA_TARGETS else list(targets)


class ArchMismatch(ValueError):
    """A config made for another model family than the checkpoint holds."""


def _component(meta: dict, name: str) -> str:
    entry = meta.get(name)
    return str(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] else ""


def detect_family(model_dir: str) -> str:
    """'sd15', 'sdxl', 'sd3', 'flux' or 'qwen_image' from a diffusers pipeline folder."""
    index = Path(model_dir) / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{model_dir} has no model_index.json: give a diffusers pipeline folder or Hub id")
    meta = json.loads(index.read_text())
    transformer = _component(meta, "transformer")
    if transformer:
        cfg = Path(model_dir) / "transformer" / "config.json"
        if cfg.exists():
            transformer = json.loads(cfg.read_text()).get("_class_name", transformer)
        family = TRANSFORMER_FAMILY.get(transformer)
        scheduler = _component(meta, "scheduler")
        if family is None or scheduler != "FlowMatchEulerDiscreteScheduler":
            raise ArchMismatch(
                f"{model_dir}: transformer {transformer or '?'} with scheduler {scheduler or '?'} is not a family "
                f"Flow-DPO trains (transformers {sorted(TRANSFORMER_FAMILY)} with FlowMatchEulerDiscreteScheduler)")
        return family
    if _component(meta, "unet"):
        return "sdxl" if "XL" in str(meta.get("_class_name", "")) or "text_encoder_2" in meta else "sd15"
    raise ArchMismatch(f"{model_dir}: neither a UNet nor a flow-matching transformer pipeline "
                       f"({meta.get('_class_name')}); give an SD1.5/SDXL/SD3/FLUX.1/Qwen-Image pipeline folder")


def check_arch(model_dir: str, arch: str, is_flow: bool, model_ref: str) -> str:
    """The checkpoint's family, checked against what the config asks for (a named arch, a flow section)."""
    family = detect_family(model_dir)
    if arch != "auto" and arch != family:
        raise ArchMismatch(f"model {model_ref!r} is a {family} checkpoint but the config says arch: {arch}; set "
                           f"arch: auto (or {family}), or point `model` at a {arch} pipeline")
    if is_flow and family in UNET_ARCHS:
        raise ArchMismatch(f"model {model_ref!r} is a {family} UNet checkpoint but the config is a Flow-DPO config "
                           "(`flow` section): remove `flow` for Diffusion-DPO, or give an SD3/FLUX.1/Qwen-Image model")
    return family


@dataclass
class FlowParts:
    arch: str
    transformer: Any
    vae: Any
    scheduler: Any
    model_dir: str

    @property
    def unet(self):  # the trained module, under the name the UNet code path uses
        return self.transformer


def load_flow_parts(model_dir: str, arch: str, vae: str | None = None) -> FlowParts:
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    cls_name = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())["_class_name"]
    transformer = getattr(diffusers, cls_name).from_pretrained(model_dir, subfolder="transformer")
    vae_cls = getattr(diffusers, _component(json.loads((Path(model_dir) / "model_index.json").read_text()), "vae"))
    vae_model = vae_cls.from_pretrained(vae) if vae else vae_cls.from_pretrained(model_dir, subfolder="vae")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    return FlowParts(arch, transformer, vae_model, scheduler, model_dir)


@torch.no_grad()
def encode_flow_latents(parts: FlowParts, pixels: torch.Tensor, generators: list[torch.Generator],
                        batch_size: int) -> torch.Tensor:
    """Normalised VAE latents (B, C, h, w) of images in [-1, 1]: (z − shift)·scale for SD3/FLUX's
    AutoencoderKL, (z − mean)/std per channel for Qwen-Image's video VAE (one frame)."""
    vae, out = parts.vae, []
    for i in range(0, pixels.shape[0], batch_size):
        x = pixels[i: i + batch_size]
        dist = vae.encode(x[:, :, None] if parts.arch == "qwen_image" else x).latent_dist
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators[i: i + batch_size]])
        out.append(dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype))
    z = torch.cat(out)
    if parts.arch == "qwen_image":
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z)
        std = torch.tensor(vae.config.latents_std).view(shape).to(z)
        return ((z - mean) / std)[:, :, 0]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2·w/2, 4C): the 2×2 patch tokens of FLUX and Qwen-Image (their `_pack_latents`)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def flux_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FLUX's img_ids for a (h/2, w/2) token grid: (0, row, column) per token."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def predict(parts: FlowParts, transformer, noisy: torch.Tensor, sigmas: torch.Tensor, timesteps: torch.Tensor,
            text: dict, guidance_scale: float = 3.5) -> torch.Tensor:
    """The velocity the transformer predicts for noisy latents (B, C, h, w), as (B, C, h, w).

    SD3 takes the latents as they are and timesteps on the 0..1000 scale; FLUX and Qwen-Image take
    2×2-packed tokens and σ (timestep / 1000), FLUX also img_ids/txt_ids and, when its transformer
    has one, the guidance embedding; Qwen-Image the text mask and the image shapes.
    """
    b, _, h, w = noisy.shape
    if parts.arch == "sd3":
        return transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text["prompt_embeds"],
                           pooled_projections=text["pooled_prompt_embeds"], return_dict=False)[0]
    tokens = pack(noisy)
    if parts.arch == "flux":
        base = transformer.module if hasattr(transformer, "module") else transformer
        guidance = (torch.full((b,), guidance_scale, device=noisy.device, dtype=noisy.dtype)
                    if base.config.guidance_embeds else None)
        txt_ids = torch.zeros(text["prompt_embeds"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        out = transformer(hidden_states=tokens, timestep=sigmas.to(noisy.dtype), guidance=guidance,
                          pooled_projections=text["pooled_prompt_embeds"], encoder_hidden_states=text["prompt_embeds"],
                          txt_ids=txt_ids, img_ids=flux_image_ids(h, w, noisy.device, noisy.dtype),
                          return_dict=False)[0]
    else:
        out = transformer(hidden_states=tokens, timestep=sigmas.to(noisy.dtype),
                          encoder_hidden_states=text["prompt_embeds"],
                          encoder_hidden_states_mask=text["prompt_embeds_mask"],
                          img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return unpack(out, h, w)


def pipeline_class(arch: str):
    import diffusers

    return getattr(diffusers, PIPELINE[arch])


def save_flow_lora(transformer, out_dir: Path, arch: str, weight_name: str, state_dict: dict | None = None) -> None:
    """The transformer's LoRA in diffusers' layout: `pipe.load_lora_weights(out_dir)` loads it. The peft
    keys as they are (lora_A / lora_B), as diffusers' SD3/FLUX LoRA scripts save them; the UNet-era
    conversion would rename some attention keys to lora.down/up and the loader would skip them."""
    from peft.utils import get_peft_model_state_dict

    metadata = transformer.peft_config["default"].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    layers = get_peft_model_state_dict(transformer, state_dict=state_dict)  # state_dict: gathered from FSDP shards
    pipeline_class(arch).save_lora_weights(out_dir, transformer_lora_layers=layers, weight_name=weight_name,
                                           transformer_lora_adapter_metadata=metadata)


def lora_base_check(init_from_meta: dict | None, lora_state: dict, arch: str, init_from: str) -> None:
    """Refuse a LoRA made for another base: another family (its finetune.json, or its key prefixes)."""
    other = (init_from_meta or {}).get("arch")
    if other and other != arch:
        raise ArchMismatch(f"init_from {init_from}: made for a {other} model, this run trains a {arch} model; "
                           f"give a LoRA trained on the same base, or drop init_from")
    prefix = "unet." if arch in UNET_ARCHS else "transformer."
    if lora_state and not any(k.startswith(prefix) for k in lora_state):
        found = sorted({k.split(".", 1)[0] for k in lora_state})
        raise ArchMismatch(f"init_from {init_from}: its LoRA holds {found} weights, not {prefix[:-1]} weights of a "
                           f"{arch} model; give a LoRA trained on the same base, or drop init_from")
