"""Tiny twins of the Qwen-VL reward judges (HPSv3, EditReward), in their references' checkpoint layouts.

Each judge folder holds `base/` (a tiny Qwen2-VL / Qwen2.5-VL with its processor and chat template: the
reward's `backbone:`) and the reward checkpoint as its reference saves it: the base model with the
`<|Reward|>` token added (embeddings one row longer) plus the `ranknet` head(s) Linear(h, 1024) → 16 → 2,
all in one safetensors file. HPSv3 was trained with transformers 4.45, so its file uses the legacy
key names (`model.layers…`, `visual…`); EditReward (4.57) uses today's (`model.language_model…`).
The processors keep the real base models' pixel limits (3136 .. 12845056), so the 256·28·28-pixel
images both judges prepare reach the vision tower unchanged, as with the real models.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .vlm import IM_END, PAD, QWEN_CHAT_TEMPLATE, _finish, _text_config, build_bpe_tokenizer

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
MIN_PIXELS, MAX_PIXELS = 56 * 56, 16384 * 28 * 28  # Qwen2-VL-7B-Instruct's preprocessor_config.json
HEAD = (1024, 16, 2)


def _ids(tok) -> dict:
    return dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), tie_word_embeddings=False)


def _text(tok, vocab: int) -> dict:
    # head_dim 16: M-RoPE sections (temporal, height, width) must sum to head_dim / 2.
    return _text_config(vocab, tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD),
                        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})


def qwen2_vl_config(tok, vocab: int):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(text_config=_text(tok, vocab),
                         vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2,
                                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                         **_ids(tok))


def qwen2_5_vl_config(tok, vocab: int):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(text_config=_text(tok, vocab),
                            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                                               spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                                               fullatt_block_indexes=[1], out_hidden_size=64),
                            **_ids(tok))


def _processor(family: str, tok):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), tokenizer=tok,
               video_processor=Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
               chat_template=QWEN_CHAT_TEMPLATE)


def ranknet_state(gen: torch.Generator, prefix: str, hidden: int) -> dict[str, torch.Tensor]:
    sd, fan_in = {}, hidden
    for i, out_f in zip((0, 3, 5), HEAD):
        bound = fan_in ** -0.5
        sd[f"{prefix}.{i}.weight"] = (torch.rand(out_f, fan_in, generator=gen) * 2 - 1) * bound
        sd[f"{prefix}.{i}.bias"] = (torch.rand(out_f, generator=gen) * 2 - 1) * bound
        fan_in = out_f
    return sd


def legacy_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Today's names -> those of transformers < 4.52 (what HPSv3's checkpoint uses)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        out[k] = v
    return out


def build_tiny_judge(out_dir: str | os.PathLike, family: str, seed: int = 0) -> Path:
    """`base/` + the reward checkpoint of HPSv3 (family qwen2_vl) or EditReward (qwen2_5_vl)."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    out = Path(out_dir)
    tok = build_bpe_tokenizer(VISION_TOKENS)
    make_config, cls = ((qwen2_vl_config, Qwen2VLForConditionalGeneration) if family == "qwen2_vl"
                        else (qwen2_5_vl_config, Qwen2_5_VLForConditionalGeneration))
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG
        torch.manual_seed(seed)
        base = cls(make_config(tok, len(tok)))
        torch.manual_seed(seed + 1)
        reward = cls(make_config(tok, len(tok) + 1))  # + <|Reward|>, as the references resize the embeddings
    _finish(base, _processor(family, tok), tok, out / "base")
    gen = torch.Generator().manual_seed(seed + 2)
    sd = {k: v.contiguous() for k, v in reward.state_dict().items()}
    if family == "qwen2_vl":
        sd = legacy_keys(sd) | ranknet_state(gen, "rm_head", 64)
        save_file(sd, str(out / "HPSv3.safetensors"))
    else:
        sd = sd | ranknet_state(gen, "rm_heads.head_0", 64) | ranknet_state(gen, "rm_heads.head_1", 64)
        save_file(sd, str(out / "model.safetensors"))
    return out
