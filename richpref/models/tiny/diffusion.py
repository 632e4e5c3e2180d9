"""Tiny random-weight Stable Diffusion 1.5 and ControlNet checkpoints, built offline.

They have the real architectures (UNet with cross-attention, ×8 VAE, CLIP text encoder with the real
49408-token vocabulary, DDIM scheduler), so every code path of the generator and the editor runs
end to end on CPU in a fraction of a second. The images are noise-like: these checkpoints exist for
tests, CI and the offline demo, not for quality.

Weights depend only on `seed`: the same seed gives bit-identical files.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer

# Ids of CLIP's special tokens in the real vocabulary (the last two entries).
_BOS_ID = CLIP_VOCAB_SIZE - 2  # <|startoftext|>
_EOS_ID = CLIP_VOCAB_SIZE - 1  # <|endoftext|>, also used as pad

# Tiny SD sizes, shared by the builders so the ControlNet always matches its UNet.
_TEXT_HIDDEN = 32
_LATENT_CHANNELS = 4


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        # Latent side at the pipeline's default size: 8 × 8 (VAE factor) = 64 px images by default.
        sample_size=8,
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    # Four blocks -> three downsamplings -> latents 8× smaller than the image, like SD's VAE.
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    )


def _tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=_TEXT_HIDDEN,
        layer_norm_eps=1e-5,
        bos_token_id=_BOS_ID,
        eos_token_id=_EOS_ID,
        pad_token_id=_EOS_ID,
    )
    return CLIPTextModel(config).eval()


def _tiny_scheduler():
    from diffusers import DDIMScheduler

    # SD 1.5's own scheduler settings, so swapping in another scheduler via from_config behaves as on SD.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_sd15(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny random StableDiffusionPipeline at `out_dir` and return the path.

    Loadable offline with `DiffusionPipeline.from_pretrained(out_dir)`. About 7 MB on disk, most of it
    the text encoder's 49408×32 token embedding (the real CLIP vocabulary keeps prompts meaningful
    to the tokenizer).
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    # fork_rng: seed the components without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet()
        torch.manual_seed(seed + 1)
        vae = _tiny_vae()
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_text_encoder()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=_tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _randomize_control_paths(controlnet) -> None:
    """Make the control image visibly steer a random ControlNet.

    A fresh ControlNet is a no-op by design (zero convolutions), and with PyTorch's default init the
    8-conv conditioning embedding shrinks its input to almost nothing. Variance-preserving init for
    the embedding, a scaled output conv and default-initialised zero convs give residuals that
    depend on the control image, so tests can tell control kinds apart and catch wiring mistakes.
    """
    from torch import nn

    embedding = controlnet.controlnet_cond_embedding
    with torch.no_grad():
        for module in embedding.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(embedding.conv_out.weight, std=0.15)
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.reset_parameters()


def build_tiny_controlnet(sd_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny random ControlNet matching the UNet saved in `sd_dir` (from `build_tiny_sd15`).

    `from_unet` copies the UNet's encoder weights (as real ControlNet training starts), then the
    conditioning embedding (4 stages: ×8 down to the latent size) is random under `seed`, and so are
    the zero convolutions (see `_randomize_control_paths`).
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(sd_dir) / "unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
        _randomize_control_paths(controlnet)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    controlnet.save_pretrained(out, safe_serialization=True)
    return out


# --- SDXL ----------------------------------------------------------------------------------------

# SDXL conditions on both encoders' hidden states concatenated (cross-attention width = their sum)
# and, through `text_time`, on encoder 2's pooled projection plus six micro-conditioning numbers
# (original size, crop corner, target size), each embedded in `_SDXL_TIME_DIM` channels.
_SDXL_TIME_DIM = 8
_SDXL_POOLED_DIM = _TEXT_HIDDEN  # text_encoder_2's projection_dim


def _tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,  # 64 px images by default, as the SD 1.5 tiny model
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,  # as SDXL's transformer blocks
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * _TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_DIM + _SDXL_POOLED_DIM,
        norm_num_groups=32,
    )


def _tiny_text_encoder_with_projection():
    from transformers import CLIPTextModelWithProjection

    # Same sizes as `_tiny_text_encoder`; SDXL reads its penultimate layer, so two layers are the minimum.
    return CLIPTextModelWithProjection(_tiny_text_encoder().config).eval()


def _tiny_sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    # SDXL base 1.0's scheduler and settings.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny random StableDiffusionXLPipeline at `out_dir` and return the path.

    Two CLIP text encoders (the second with a projection, as SDXL's OpenCLIP bigG), a UNet with
    `addition_embed_type="text_time"`, a ×8 VAE and SDXL's Euler scheduler. About 14 MB on disk,
    mostly the two real-vocabulary token embeddings. Loadable offline with `DiffusionPipeline`.
    """
    from diffusers import StableDiffusionXLPipeline

    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_sdxl_unet()
        torch.manual_seed(seed + 1)
        vae = _tiny_vae()
        vae.register_to_config(scaling_factor=0.13025)  # SDXL's VAE latent scale
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_text_encoder()
        torch.manual_seed(seed + 3)
        text_encoder_2 = _tiny_text_encoder_with_projection()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=_tiny_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_sdxl_controlnet(
    sdxl_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0
) -> Path:
    """Build a tiny random SDXL ControlNet matching the UNet saved in `sdxl_dir` (`build_tiny_sdxl`).

    As `build_tiny_controlnet`: the encoder is copied from the UNet (so it has SDXL's text_time
    embedding), the control paths are random under `seed`.
    """
    return build_tiny_controlnet(sdxl_dir, out_dir, seed=seed)


# --- ControlNet annotators -----------------------------------------------------------------------


def build_random_annotator(kind: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write random weights for the annotator network behind control `kind` ("softedge_hed",
    "softedge_pidi", "lineart") to `out_dir`, named and laid out as in lllyasviel/Annotators, and
    return the file's path.

    The networks keep their real sizes (HED ~59 MB, line art ~17 MB, PiDiNet ~3 MB): their maps
    follow image content but are not edges. For tests of the loading path and of network controls.
    """
    from ..editor import ANNOTATOR_FILES, annotator_network, annotator_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = annotator_network(kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ANNOTATOR_FILES[kind]
    torch.save(annotator_state_dict(kind, net), path)
    return path
