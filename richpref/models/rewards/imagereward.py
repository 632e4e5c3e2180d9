"""ImageReward (THUDM/ImageReward v1.0) on transformers' BLIP modules, loading the original checkpoint.

The release is `ImageReward.pt` (a plain fp32 state dict) + `med_config.json` (BLIP's BERT config):

    blip.visual_encoder.*   BLIP ViT-L/16 (timm-style names: cls_token, pos_embed, blocks.N.attn.qkv, …)
    blip.text_encoder.*     BLIP's BERT with a cross-attention block in every layer (med.py names)
    blip.vision_proj.*, blip.text_proj.*   pre-training projections, unused for the reward
    mlp.layers.{0,2,4,6,7}  768→1024→128→64→16→1, no activations

Score, as `ImageReward.score`: prompt → bert-base-uncased tokenizer (+`[DEC]` bos, `[ENC]`), padded to 35;
image → short side 224 bicubic, center crop, CLIP mean/std; ViT tokens (all, incl. CLS) → BERT with
cross-attention to them (all-ones image mask) → `last_hidden_state[:, 0]` → MLP → (r − mean) / std.

The ViT's layout is read from the checkpoint's shapes (width, depth, patch, image size); BLIP's ViTs
all use 64-wide attention heads, so heads = width / 64, and LayerNorm eps 1e-6, exact GELU.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from ..runtime import resolve_device, resolve_dtype
from .base import (LinearHead, RewardLoadError, batches, check_lengths, checkpoint_file, load_lenient, load_state_dict,
                   log, subdict)
from .preprocess import clip_pixels

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
VIT_HEAD_DIM = 64
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"


def vit_state_to_transformers(sd: dict[str, torch.Tensor], unknown: list[str] | None = None) -> dict[str, torch.Tensor]:
    """BLIP/timm ViT names -> transformers `BlipVisionModel` names (same tensors, fused qkv kept).

    A key of no known shape raises, or, given an `unknown` list, is left out and listed there."""
    top = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
           "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
           "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
           "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    block = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
             "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        parts = k.split(".")
        inner = ".".join(parts[2:-1])
        if parts[0] != "blocks" or len(parts) < 4 or inner not in block:
            if unknown is None:
                raise RewardLoadError(f"ImageReward: unexpected vision key blip.visual_encoder.{k}")
            unknown.append(f"blip.visual_encoder.{k}")
            continue
        out[f"encoder.layers.{parts[1]}.{block[inner]}.{parts[-1]}"] = v
    return out


def vision_config_from_state(sd: dict[str, torch.Tensor]):
    from transformers import BlipVisionConfig

    width = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if width % VIT_HEAD_DIM:
        raise RewardLoadError(f"ImageReward: ViT width {width} is not a multiple of BLIP's head width {VIT_HEAD_DIM}")
    return BlipVisionConfig(hidden_size=width, intermediate_size=sd["blocks.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=width // VIT_HEAD_DIM, image_size=grid * patch,
                            patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)


def text_config_from_med(med: dict, encoder_width: int, tokenizer):
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise RewardLoadError("ImageReward: med_config.json has no add_cross_attention=true; not BLIP's MED config")
    # BLIP_Pretrain overrides the file's encoder_width with the ViT's width.
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_act=med.get("hidden_act", "gelu"), pad_token_id=med.get("pad_token_id", 0),
        bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, encoder_hidden_size=encoder_width,
        is_decoder=True,  # transformers builds the cross-attention blocks only for is_decoder; forward stays bidirectional
    )


def blip_tokenizer(path: str):
    """BLIP's `init_tokenizer`: bert-base-uncased + `[DEC]` as bos + `[ENC]` (30522 + 2 = 30524 ids)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(path)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward:
    def __init__(self, path: str, *, processor: str | None = None, file: str | None = None, device: str = "auto",
                 dtype: str = "auto") -> None:
        from transformers import BlipTextModel, BlipVisionModel

        self.model_id = path
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        sd = load_state_dict(checkpoint_file(path, file or "ImageReward.pt"))
        with open(checkpoint_file(path, "med_config.json"), encoding="utf-8") as f:
            med = json.load(f)
        what = f"ImageReward {path}"
        # The reference loads with strict=False: tensors it does not use are ignored (logged here);
        # only missing weights are an error.
        known = ("blip.visual_encoder.", "blip.text_encoder.", "blip.vision_proj.", "blip.text_proj.", "mlp.")
        stray = [k for k in sd if not k.startswith(known)]

        vis_sd = subdict(sd, "blip.visual_encoder.")
        if "cls_token" not in vis_sd:
            raise RewardLoadError(f"{what}: no blip.visual_encoder.cls_token; is it ImageReward.pt?")
        vision_cfg = vision_config_from_state(vis_sd)
        self.vision = BlipVisionModel(vision_cfg)
        vis_converted = vit_state_to_transformers(vis_sd, stray)
        try:
            stray += [f"blip.visual_encoder.{k}" for k in load_lenient(self.vision, vis_converted, f"{what} (vision)")]
        except RewardLoadError as exc:  # name the tensors the conversion could not place too
            raise RewardLoadError(f"{exc} Vision tensors of no known name: {stray[:5]}") from None

        self.tokenizer = blip_tokenizer(processor or DEFAULT_TOKENIZER)
        text_cfg = text_config_from_med(med, vision_cfg.hidden_size, self.tokenizer)
        text_cfg._attn_implementation = "eager"
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        stray += [f"blip.text_encoder.{k}" for k in load_lenient(self.text, subdict(sd, "blip.text_encoder."), f"{what} (text)")]

        self.mlp = LinearHead(subdict(sd, "mlp."), f"{what} (mlp)", strict=False)
        stray += [f"mlp.{k}" for k in self.mlp.unused_keys]
        if stray:
            log.warning("%s: %d checkpoint tensors unused, as in the reference's non-strict load (e.g. %s)", what,
                        len(stray), stray[:3])
        self.unused_keys = stray
        if len(self.tokenizer) != text_cfg.vocab_size:
            raise RewardLoadError(f"{what}: tokenizer {processor or DEFAULT_TOKENIZER} has {len(self.tokenizer)} ids "
                                  f"but the text encoder {text_cfg.vocab_size}; use bert-base-uncased")
        self.image_size = vision_cfg.image_size
        for m in (self.vision, self.text):
            m.to(self.device, self.dtype).eval()
        self.mlp.to(self.device).eval()  # the reference runs the head in float32 (`.float()` features)

    @torch.inference_mode()
    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        check_lengths(images, prompts)
        out = []
        for sl in batches(len(images), batch_size):
            pix = clip_pixels(images[sl], self.image_size).to(self.device, self.dtype)
            image_embeds = self.vision(pixel_values=pix).last_hidden_state
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            tok = self.tokenizer(list(prompts[sl]), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH,
                                 return_tensors="pt")
            text = self.text(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device),
                             encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
            rewards = self.mlp(text.last_hidden_state[:, 0, :].float()).squeeze(-1)
            out.append(((rewards - REWARD_MEAN) / REWARD_STD).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def close(self) -> None:
        self.vision = self.text = self.mlp = None
