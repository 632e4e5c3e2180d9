"""Tiny random-weight CLIP (real `CLIPModel` architecture and real CLIP tokenizer), for the reward stage."""
from __future__ import annotations

from pathlib import Path

import torch

from ..tokenizers import CLIP_VOCAB_SIZE, clip_tokenizer


def build_tiny_clip(out_dir, seed: int = 0, image_size: int = 56) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(out_dir)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=image_size, patch_size=14, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=clip_tokenizer(),
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
