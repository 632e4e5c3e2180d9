"""Tiny random-weight flow-matching text-to-image pipelines: SD3/SD3.5, FLUX.1 [dev] and Qwen-Image.

Same classes and tokenizer kinds as the real checkpoints (stabilityai/stable-diffusion-3.5-medium,
black-forest-labs/FLUX.1-dev, Qwen/Qwen-Image), configs shrunk to a few dozen channels so each pipeline
draws a 64 px image in a fraction of a second on CPU. FLUX.1 and Qwen-Image share their parts (and
their builders) with the tiny FLUX.1 Kontext and Qwen-Image-Edit editors (models/tiny/editors.py).
Weights depend only on `seed`.
"""
from __future__ import annotations

import os
from pathlib import Path

from .editors import (_TEXT_HIDDEN, _clip_text_encoder, _save, _sd_vae, _seeded, flux_components,
                      qwen_image_components, small_clip_tokenizer, small_t5_tokenizer)

# Folder of each tiny flow-matching text-to-image pipeline under the tiny models root.
FLOW_LAYOUT = {"sd3": "sd3", "flux": "flux", "qwen_image": "qwen-image"}


def build_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """StableDiffusion3Pipeline shaped as SD3.5 Medium: an MMDiT with dual-attention (MMDiT-X) in its
    first block and RMS q/k norms, CLIP-L and CLIP-G (both with projection: the pooled prompt is their
    two projections side by side), T5 for the sequence, the 16-channel ×8 VAE and shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    clip_tok, t5_tok = small_clip_tokenizer(), small_t5_tokenizer()
    latent, t5_dim = 16, 2 * _TEXT_HIDDEN  # the two CLIPs' hidden states, padded to T5's width, form one sequence
    transformer = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=latent, out_channels=latent, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=t5_dim, caption_projection_dim=32,
        pooled_projection_dim=2 * _TEXT_HIDDEN, pos_embed_max_size=32, dual_attention_layers=(0,),
        qk_norm="rms_norm"))
    t5 = _seeded(seed + 1, lambda: T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=t5_dim, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval())
    vae = _seeded(seed + 2, lambda: _sd_vae(latent, use_quant_conv=False, use_post_quant_conv=False,
                                            shift_factor=0.0609, scaling_factor=1.5305))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_seeded(seed + 3, lambda: _clip_text_encoder(len(clip_tok), with_projection=True)),
        tokenizer=clip_tok,
        text_encoder_2=_seeded(seed + 4, lambda: _clip_text_encoder(len(clip_tok), with_projection=True)),
        tokenizer_2=small_clip_tokenizer(), text_encoder_3=t5, tokenizer_3=t5_tok)
    return _save(pipe, out_dir)


def build_tiny_flux(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """FluxPipeline shaped as FLUX.1 [dev]: the tiny FLUX.1 parts with the guidance embedding."""
    from diffusers import FluxPipeline

    return _save(FluxPipeline(**flux_components(seed, guidance_embeds=True)), out_dir)


def build_tiny_qwen_image(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """QwenImagePipeline: the tiny Qwen-Image parts (Qwen2.5-VL text encoder, no processor)."""
    from diffusers import QwenImagePipeline

    return _save(QwenImagePipeline(**qwen_image_components(seed)), out_dir)


def build_tiny_flow(root: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Build every tiny flow-matching text-to-image pipeline under `root`; returns key -> folder."""
    root = Path(root)
    build_tiny_sd3(root / FLOW_LAYOUT["sd3"], seed=seed)
    build_tiny_flux(root / FLOW_LAYOUT["flux"], seed=seed + 10)
    build_tiny_qwen_image(root / FLOW_LAYOUT["qwen_image"], seed=seed + 20)
    return {k: str(root / v) for k, v in FLOW_LAYOUT.items()}
