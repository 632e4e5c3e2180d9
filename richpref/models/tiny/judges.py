"""A tiny LoRA adapter on the tiny Qwen2.5-VL, in the layout EditScore publishes (peft
`adapter_config.json` + `adapter_model.safetensors` on the base's language-model projections), so
the `edit_score` judge loads and merges it through the code that loads the real one."""
from __future__ import annotations

from pathlib import Path


def build_tiny_lora(base_dir, out_dir, seed: int = 0) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(str(base_dir), dtype=torch.float32)
    # init_lora_weights=False: A and B both random, so the merged model differs from its base.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
                     init_lora_weights=False, lora_dropout=0.0)
    from richpref.models.runtime import peft_wrapping

    with peft_wrapping():
        peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out))
    return out
