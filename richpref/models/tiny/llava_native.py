"""A tiny checkpoint in LLaVA-NeXT's native `llava_qwen` layout, for testing the critic converter."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .vlm import IM_END, build_bpe_tokenizer


def native_llava_qwen_shapes(text: dict, vision: dict, vocab_rows: int, *, vision_layers: int,
                             with_head: bool = False, tie_embeddings: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LLaVA-NeXT `llava_qwen` checkpoint, by its native name, with its shape.

    The layout `LlavaQwenForCausalLM.state_dict()` saves: Qwen2 under `model.`/`lm_head`, the SigLIP
    tower under `model.vision_tower.vision_tower.vision_model.`, the `mlp2x_gelu` projector as
    `model.mm_projector.{0,2}` and `model.image_newline`. `with_head` adds the SigLIP pooling head (a
    checkpoint saved before LLaVA-NeXT removed it); tied embeddings store no `lm_head.weight`.
    """
    h, i, heads, kv = text["hidden_size"], text["intermediate_size"], text["num_attention_heads"], text["num_key_value_heads"]
    kv_dim = kv * (h // heads)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_rows, h), "model.norm.weight": (h,)}
    if not tie_embeddings:
        shapes["lm_head.weight"] = (vocab_rows, h)
    for n in range(text["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv_dim, h), p + "self_attn.k_proj.bias": (kv_dim,),
            p + "self_attn.v_proj.weight": (kv_dim, h), p + "self_attn.v_proj.bias": (kv_dim,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    vh, vi, patch, side = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"], vision["image_size"]
    t = "model.vision_tower.vision_tower.vision_model."
    shapes.update({
        t + "embeddings.patch_embedding.weight": (vh, 3, patch, patch), t + "embeddings.patch_embedding.bias": (vh,),
        t + "embeddings.position_embedding.weight": ((side // patch) ** 2, vh),
        t + "post_layernorm.weight": (vh,), t + "post_layernorm.bias": (vh,),
    })
    for n in range(vision_layers):
        p = f"{t}encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (vh, vh)
            shapes[p + f"self_attn.{proj}.bias"] = (vh,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p + f"{norm}.weight"] = (vh,)
            shapes[p + f"{norm}.bias"] = (vh,)
        shapes.update({p + "mlp.fc1.weight": (vi, vh), p + "mlp.fc1.bias": (vi,),
                       p + "mlp.fc2.weight": (vh, vi), p + "mlp.fc2.bias": (vh,)})
    if with_head:
        shapes.update({
            t + "head.probe": (1, 1, vh), t + "head.attention.in_proj_weight": (3 * vh, vh),
            t + "head.attention.in_proj_bias": (3 * vh,), t + "head.attention.out_proj.weight": (vh, vh),
            t + "head.attention.out_proj.bias": (vh,), t + "head.layernorm.weight": (vh,), t + "head.layernorm.bias": (vh,),
            t + "head.mlp.fc1.weight": (vi, vh), t + "head.mlp.fc1.bias": (vi,),
            t + "head.mlp.fc2.weight": (vh, vi), t + "head.mlp.fc2.bias": (vh,),
        })
    shapes.update({"model.mm_projector.0.weight": (h, vh), "model.mm_projector.0.bias": (h,),
                   "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,),
                   "model.image_newline": (h,)})
    return shapes


def build_tiny_llava_native(out_dir: str | os.PathLike, seed: int = 0, *, spare_vocab_rows: int = 8, shards: int = 2,
                            extra_vision_layer: bool = False, tie_embeddings: bool = False) -> Path:
    """A tiny checkpoint in LLaVA-NeXT's native `llava_qwen` layout (the layout of lmms-lab/llava-critic-7b).

    Random weights under the real tensor names, a config.json with the real LLaVA-NeXT fields (small
    dims), a Qwen-style tokenizer without `<image>` (LLaVA-NeXT never tokenised it), weights in
    `shards` safetensors files with an index. `spare_vocab_rows` unused embedding rows follow the
    tokenizer's ids, as in Qwen2 (0 makes the converter append rows). `extra_vision_layer` stores
    the SigLIP layer and pooling head LLaVA-NeXT deletes, which a converter must leave out.
    """
    import json

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_bpe_tokenizer([])
    eos = tok.convert_tokens_to_ids(IM_END)
    rows = len(tok) + spare_vocab_rows
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    vision = dict(hidden_size=32, intermediate_size=64, patch_size=14, image_size=56, num_attention_heads=2)
    used_layers = 2
    shapes = native_llava_qwen_shapes(text, vision, rows, vision_layers=used_layers + int(extra_vision_layer),
                                      with_head=extra_vision_layer, tie_embeddings=tie_embeddings)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith(("layernorm.weight", "norm.weight", "layer_norm1.weight", "layer_norm2.weight")):
            tensors[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = 0.05 * torch.randn(shape, generator=gen)
    names = list(tensors)
    weight_map, total = {}, 0
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        total += sum(tensors[n].numel() * 4 for n in part)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    side = vision["image_size"]
    config = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        "attention_dropout": 0.0,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        **{k: v for k, v in text.items()},
        "image_aspect_ratio": "anyres_max_9",
        "image_crop_resolution": None,
        # LLaVA-NeXT's own range notation, expanded in tiles of the tower's image size.
        "image_grid_pinpoints": "(1x1),...,(2x2)",
        "image_split_resolution": None,
        "image_token_index": len(tok),
        "initializer_range": 0.02,
        "max_position_embeddings": 2048,
        "max_window_layers": 2,
        "mm_hidden_size": vision["hidden_size"],
        "mm_newline_position": "one_token",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_spatial_pool_mode": "bilinear",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "richpref/tiny-siglip-56",  # unknown to the converter: heads come from the caller
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 2048,
        "tie_word_embeddings": tie_embeddings,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": "float32",
        "use_cache": True,
        "use_mm_proj": True,
        "use_sliding_window": False,
        "vocab_size": rows,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(out)
    (out / "tiny_native.json").write_text(json.dumps({"vision": vision, "text": text, "seed": seed,
                                                      "vision_layers_used": used_layers, "image_size": side}))
    return out
