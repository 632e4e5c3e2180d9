"""Tiny random-weight instruction editors of the real architectures, built offline.

One builder per editor kind besides ControlNet img2img (see models/editors): InstructPix2Pix (SD 1.5
and SDXL: an 8-channel UNet that reads the original's latents beside the noise), FLUX.1 Kontext
(a Flux MMDiT with guidance embedding, CLIP + T5 text encoders, a 16-channel ×8 VAE) and
Qwen-Image-Edit (a Qwen-Image MMDiT conditioned on a Qwen2.5-VL that sees the image, the Wan-style
×8 VAE). Sizes follow diffusers' own pipeline tests: a few dozen channels, one or two layers, so each
pipeline edits a 64 px image in well under a second on CPU and takes a few MB on disk.

Tokenizers are trained in memory (`tokenizers`) on a small built-in corpus: a truncated real CLIP
BPE, a Unigram for T5, a byte-level BPE with Qwen's special tokens. Weights depend only on `seed`.
Each editor kind's declaration (richpref/schemas/editor_kinds/) names its builders here.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

_CORPUS = """\
make the sky orange and purple at sunset
add a red hat to the cat and keep everything else the same
remove the extra hand from the person on the left
replace the yellow umbrella with a black one
change the color of the shirt from green to blue
fix the distorted fingers, make the text on the sign readable
a photo of a dog running on a beach near the water
a portrait of a woman with long brown hair and a gentle smile
a city street at night with neon lights and rain
two birds sitting on a branch in the snow
""".splitlines()


def _seeded(seed: int, build):
    """`build()` under `torch.manual_seed(seed)`, leaving the caller's RNG state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# --- tokenizers ----------------------------------------------------------------------------------


def small_clip_tokenizer(num_merges: int = 1000):
    """A CLIP tokenizer with the first `num_merges` merges of the real CLIP BPE (open_clip ships the
    file): real token ids for common words, a vocabulary of ~1.5k instead of 49408."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : num_merges + 1]
    merges = [tuple(line.split()) for line in lines]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77,
                         pad_token="<|endoftext|>")


def small_t5_tokenizer(vocab_size: int = 400):
    """A T5 (SentencePiece Unigram) tokenizer trained on the built-in corpus; pad 0, eos 1, unk 2 as T5."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    pieces = [tuple(p) for p in json.loads(tok.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# Qwen-Image's system prompt (diffusers' QwenImagePipeline template): trained into the tiny Qwen BPE so
# that, as with Qwen's real vocabulary, the template before the user's text is 34 tokens, the number
# the pipeline drops from the encoder's output (its `prompt_template_encode_start_idx`).
QWEN_IMAGE_SYSTEM = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                     "relationships of the objects and background:")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]


def small_qwen2_tokenizer(vocab_size: int = 600):
    """A Qwen2 byte-level BPE trained on the built-in corpus, with Qwen's chat and vision tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4 + [QWEN_IMAGE_SYSTEM, "system", "user", "assistant"] * 10, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    qwen = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=4096)
    qwen.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    qwen.pad_token = "<|endoftext|>"
    return qwen


# --- shared pieces -------------------------------------------------------------------------------

_TEXT_HIDDEN = 32


def _clip_text_encoder(vocab_size: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=_TEXT_HIDDEN, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=_TEXT_HIDDEN, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                            pad_token_id=vocab_size - 1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _sd_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    # Four blocks: three downsamplings, latents 8x smaller than the image, as every real editor's VAE.
    return AutoencoderKL(block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=latent_channels, norm_num_groups=8, layers_per_block=1, sample_size=64,
                         **extra)


def _save(pipe, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# --- InstructPix2Pix -----------------------------------------------------------------------------


def build_tiny_instruct_pix2pix(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """StableDiffusionInstructPix2PixPipeline: SD 1.5 with 8 UNet input channels (noise + image
    latents) and the Euler ancestral scheduler, as timbrooks/instruct-pix2pix."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel

    tokenizer = small_clip_tokenizer()
    unet = _seeded(seed, lambda: UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=32))
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=_seeded(seed + 1, _sd_vae),
        text_encoder=_seeded(seed + 2, lambda: _clip_text_encoder(len(tokenizer))),
        tokenizer=tokenizer, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, out_dir)


def build_tiny_instruct_pix2pix_sdxl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """StableDiffusionXLInstructPix2PixPipeline: an SDXL UNet (two text encoders, text_time
    conditioning) with 8 input channels, as diffusers/sdxl-instructpix2pix-768."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInstructPix2PixPipeline, UNet2DConditionModel

    tokenizer = small_clip_tokenizer()
    time_dim = 8
    unet = _seeded(seed, lambda: UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=8, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * _TEXT_HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + _TEXT_HIDDEN, norm_num_groups=32))
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        vae=_seeded(seed + 1, lambda: _sd_vae(scaling_factor=0.13025)),
        text_encoder=_seeded(seed + 2, lambda: _clip_text_encoder(len(tokenizer))),
        text_encoder_2=_seeded(seed + 3, lambda: _clip_text_encoder(len(tokenizer), with_projection=True)),
        tokenizer=tokenizer, tokenizer_2=small_clip_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=True, add_watermarker=False, is_cosxl_edit=False)
    return _save(pipe, out_dir)


# --- FLUX.1 Kontext ------------------------------------------------------------------------------


def flux_components(seed: int = 0, guidance_embeds: bool = True) -> dict:
    """The parts every tiny FLUX.1 pipeline shares (FluxPipeline, FluxKontextPipeline): a Flux MMDiT
    (with the guidance embedding of the distilled [dev] models, or without as [schnell]), CLIP for the
    pooled prompt, T5 for the token sequence, a 16-channel ×8 VAE and the dynamic-shift scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    clip_tok, t5_tok = small_clip_tokenizer(), small_t5_tokenizer()
    latent = 16
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=latent * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_TEXT_HIDDEN, pooled_projection_dim=_TEXT_HIDDEN,
        guidance_embeds=guidance_embeds, axes_dims_rope=[4, 6, 6]))
    t5 = _seeded(seed + 1, lambda: T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=_TEXT_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval())
    vae = _seeded(seed + 2, lambda: _sd_vae(latent, use_quant_conv=False, use_post_quant_conv=False,
                                            shift_factor=0.1159, scaling_factor=0.3611))
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=vae, text_encoder=_seeded(seed + 3, lambda: _clip_text_encoder(len(clip_tok))), tokenizer=clip_tok,
        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)


def build_tiny_flux_kontext(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """FluxKontextPipeline: the tiny FLUX.1 parts with guidance embedding (Kontext [dev] is guidance
    distilled)."""
    from diffusers import FluxKontextPipeline

    return _save(FluxKontextPipeline(**flux_components(seed, guidance_embeds=True)), out_dir)


# --- Qwen-Image-Edit -----------------------------------------------------------------------------


def qwen_image_components(seed: int = 0) -> dict:
    """The parts every tiny Qwen-Image pipeline shares (QwenImagePipeline, QwenImageEditPipeline): a
    Qwen-Image MMDiT, a Qwen2.5-VL text encoder (vision tower included: the editor shows it the
    original), its tokenizer, the Wan-style ×8 VAE with 16 latent channels and the scheduler."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = small_qwen2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    z_dim = 16
    transformer = _seeded(seed, lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=z_dim * 4, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=_TEXT_HIDDEN, guidance_embeds=False, axes_dims_rope=(8, 4, 4)))
    vae = _seeded(seed + 1, lambda: AutoencoderKLQwenImage(
        base_dim=16, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim))
    config = Qwen2_5_VLConfig(
        # head_dim 16: the M-RoPE sections (temporal, height, width) sum to head_dim / 2.
        text_config=dict(vocab_size=len(tok), hidden_size=_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                           out_hidden_size=_TEXT_HIDDEN),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    text_encoder = _seeded(seed + 2, lambda: Qwen2_5_VLForConditionalGeneration(config).eval())
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                  base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                  time_shift_type="exponential"),
        vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer)


def build_tiny_qwen_image_edit(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """QwenImageEditPipeline: the tiny Qwen-Image parts, with a processor so the Qwen2.5-VL text
    encoder also sees the original image."""
    from diffusers import QwenImageEditPipeline
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    parts = qwen_image_components(seed)
    # The VLM sees the original at 56..112 px (4..16 merged vision tokens).
    pixels = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=parts["tokenizer"],
                                 video_processor=Qwen2VLVideoProcessor(**pixels))
    return _save(QwenImageEditPipeline(**parts, processor=processor), out_dir)
