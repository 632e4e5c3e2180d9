"""The diffusion model parts a DPO run needs, for SD 1.5 and SDXL, and the tuned weights' round trip.

Loading goes through the components' own `from_pretrained` (safetensors, no remote code), so the
tiny test checkpoints and the real ones take the same path. Output formats are diffusers' own: a
`unet/` folder for full fine-tunes, `pytorch_lora_weights.safetensors` for LoRA, both next to a
`finetune.json` that names the base model.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..schemas.training import FinetuneConfig

# Written by a trainer that stops on bad input (richpref.training.data.DataError): relaunching
# would fail the same way, so the launcher stops and shows the message instead.
REFUSED_INPUT = "refused-input.txt"
FINETUNE_META = "finetune.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def detect_arch(model_dir: str) -> str:
    """'sdxl' or 'sd15' from a diffusers pipeline folder (its model_index.json and UNet config)."""
    index = Path(model_dir) / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{model_dir} has no model_index.json: give a diffusers pipeline folder or Hub id")
    meta = json.loads(index.read_text())
    if "XL" in str(meta.get("_class_name", "")) or "text_encoder_2" in meta:
        return "sdxl"
    return "sd15"


@dataclass
class DiffusionParts:
    arch: str
    unet: Any
    vae: Any
    noise_scheduler: Any
    tokenizers: list
    text_encoders: list
    model_dir: str


def load_parts(model_dir: str, arch: str = "auto", vae: str | None = None) -> DiffusionParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    arch = detect_arch(model_dir) if arch == "auto" else arch
    tokenizers = [AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")]
    text_encoders = [CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")]
    if arch == "sdxl":
        tokenizers.append(AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2"))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2"))
    vae_model = (AutoencoderKL.from_pretrained(vae) if vae else AutoencoderKL.from_pretrained(model_dir, subfolder="vae"))
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    # Training always adds noise the DDPM way, whatever sampler the checkpoint ships with.
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    return DiffusionParts(arch, unet, vae_model, noise_scheduler, tokenizers, text_encoders, model_dir)


@torch.no_grad()
def encode_text(parts: DiffusionParts, captions: list[str], device: torch.device, dtype: torch.dtype) -> tuple:
    """(prompt_embeds, pooled) for SDXL (penultimate hidden states of both encoders, concatenated, and
    encoder 2's projection), (last hidden state, None) for SD 1.5: what each pipeline feeds its UNet."""
    ids = [
        tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids.to(device)
        for tok in parts.tokenizers
    ]
    if parts.arch == "sd15":
        return parts.text_encoders[0](ids[0])[0].to(dtype), None
    hidden, pooled = [], None
    for enc, i in zip(parts.text_encoders, ids):
        out = enc(i, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    return torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype)


def sdxl_time_ids(original_sizes: torch.Tensor, crop_top_lefts: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning per image: (original h, w, crop top, left, target h, w)."""
    target = torch.tensor([resolution, resolution], dtype=original_sizes.dtype).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, generators: list[torch.Generator], batch_size: int) -> torch.Tensor:
    """VAE latents (a sample of each image's posterior, scaled) in chunks of `batch_size` images."""
    out = []
    for i in range(0, pixels.shape[0], batch_size):
        dist = vae.encode(pixels[i : i + batch_size]).latent_dist
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators[i : i + batch_size]])
        out.append(dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype))
    latents = torch.cat(out)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def add_lora(unet, settings) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
        init_lora_weights="gaussian" if settings.init == "gaussian" else True,
        target_modules=list(settings.target_modules),
    ))


def frozen_copy(module):
    """The reference of a full fine-tune: a frozen copy.

    It runs in train mode like the trained UNet when that changes nothing but numerics (no dropout,
    as in SD 1.5 and SDXL): some kernels differ between modes, and β = 5000 turns a rounding
    difference into a visible margin. Then model and reference agree bit for bit until the first
    update, as the LoRA reference (the same module, adapters off) does by construction.
    """
    ref = copy.deepcopy(module)
    ref.requires_grad_(False)
    has_dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in ref.modules())
    return ref.train(not has_dropout)


class AdapterSwitch:
    """Switches a LoRA UNet's adapters off for the reference pass: the same UNet without LoRA.

    diffusers' `disable_adapters()` / `enable_adapters()` walk every module of the UNet and reset the
    adapters' requires_grad on each call: about 8 ms a call on the tiny UNet, a fifth of its whole
    DPO step, and it grows with the module count. Under no_grad only the off switch that peft's
    layers read in `forward` matters, so this flips that switch on the layers found once. If peft
    stops exposing it, the public (slower) calls are used.
    """

    def __init__(self, unet) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.unet = unet
        self.layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self.direct = bool(self.layers) and all(
            isinstance(getattr(layer, "_disable_adapters", None), bool) for layer in self.layers)
        if self.direct:  # check that the flag is what the public property reports
            probe = self.layers[0]
            probe._disable_adapters = True
            self.direct = probe.disable_adapters is True
            probe._disable_adapters = False

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        if not self.direct:
            self.unet.disable_adapters()
            try:
                yield
            finally:
                self.unet.enable_adapters()
            return
        for layer in self.layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer._disable_adapters = False


def lora_state_dict(unet, state_dict: dict | None = None) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, state_dict=state_dict))


def _pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def save_tuned(unet, out_dir: Path, cfg: FinetuneConfig, arch: str, state_dict: dict | None = None) -> None:
    """Write the tuned weights in diffusers' own layout into `out_dir`. `state_dict`: the whole weights
    gathered from a sharded (FSDP) model, whose own parameters are only this process's shard."""
    from .flow_models import FLOW_ARCHS, save_flow_lora

    if state_dict is None and any(p.dtype != torch.float32 for p in unet.parameters()):
        unet = unet.to(torch.float32)
    if state_dict is not None:  # LoRA: only its own weights (peft keeps the `lora_` keys), not a float copy of the base
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()
                      if cfg.mode == "full" or "lora_" in k}
    if cfg.mode == "lora" and arch in FLOW_ARCHS:
        save_flow_lora(unet, out_dir, arch, LORA_WEIGHTS, state_dict)
    elif cfg.mode == "lora":
        metadata = unet.peft_config["default"].to_dict()
        metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
        _pipeline_class(arch).save_lora_weights(out_dir, unet_lora_layers=lora_state_dict(unet, state_dict),
                                                weight_name=LORA_WEIGHTS, unet_lora_adapter_metadata=metadata)
    elif state_dict is None:
        unet.save_pretrained(out_dir / ("transformer" if arch in FLOW_ARCHS else "unet"), safe_serialization=True)
    else:  # what save_pretrained writes (config, 10 GB safetensors shards, their index), from the gathered weights
        from huggingface_hub import save_torch_state_dict

        folder = out_dir / ("transformer" if arch in FLOW_ARCHS else "unet")
        unet.save_config(folder)
        save_torch_state_dict(state_dict, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                              max_shard_size="10GB")


def read_meta(path: str | os.PathLike) -> dict:
    """The finetune.json of a finetune output folder (or of its `final/`)."""
    p = Path(path)
    for cand in (p / FINETUNE_META, p / "final" / FINETUNE_META):
        if cand.exists():
            return {**json.loads(cand.read_text()), "_dir": str(cand.parent)}
    raise FileNotFoundError(f"{path} is not a finetune output: no {FINETUNE_META} in it or in its final/ folder")


def is_finetune_output(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / FINETUNE_META).exists() or (p / "final" / FINETUNE_META).exists()


def load_finetuned(path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto", scheduler: str | None = None,
                   safety_checker: bool = False):
    """A `TextToImage` of the base model with the tuned weights in: the UNet swapped for a full
    fine-tune, `load_lora_weights` for LoRA."""
    from diffusers import UNet2DConditionModel

    from ..models.generator import TextToImage, diffusers_dtype_kwargs
    from ..models.tuned import flow_transformer_dir, load_lora

    meta = read_meta(path)
    t2i = TextToImage.load(meta["base_model_path"], device=device, dtype=dtype, scheduler=scheduler,
                           safety_checker=safety_checker)
    final = Path(meta["_dir"])
    if meta["mode"] == "lora":
        load_lora(t2i.pipe, final, LORA_WEIGHTS)
    elif (transformer := flow_transformer_dir(final)) is not None:  # a full Flow-DPO fine-tune: the pipeline's class
        cls = type(t2i.pipe.transformer)
        t2i.pipe.transformer = cls.from_pretrained(transformer, **diffusers_dtype_kwargs(t2i.dtype)).to(t2i.device)
    else:
        unet = UNet2DConditionModel.from_pretrained(final / "unet", **diffusers_dtype_kwargs(t2i.dtype))
        t2i.pipe.unet = unet.to(t2i.device)
    t2i.model_id = str(final)
    return t2i
