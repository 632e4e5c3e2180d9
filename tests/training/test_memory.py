"""`richpref doctor --finetune`: the memory a DPO run needs per device, from the safetensors headers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_flow_step import flow_config, pairs  # noqa: F401 - pairs is a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_memory_estimate_counts_lora_full_and_fsdp(tiny_models, pairs):
    from richpref.training.memory import estimate_memory
    from richpref.training.setup import setup_model

    lora_cfg = flow_config(tiny_models, pairs, "flux", mixed_precision="bf16")
    est = estimate_memory(lora_cfg)
    trained = sum(p.numel() for p in setup_model(lora_cfg, torch.device("cpu"), torch.float32).model.parameters()
                  if p.requires_grad)
    assert est["trainable"] == trained and est["reference_gb"] == 0  # LoRA: no second copy
    assert est["weights_gb"] == pytest.approx(est["params"] * 2 / 1024**3)
    # float32 trained weights, their gradients and AdamW's two states: 16 bytes per trained parameter
    assert est["training_state_gb"] == pytest.approx(trained * 16 / 1024**3)
    full = estimate_memory(flow_config(tiny_models, pairs, "flux", mode="full"))
    sharded = estimate_memory(flow_config(tiny_models, pairs, "flux", mode="full", fsdp=True), num_processes=4)
    assert full["reference_gb"] == pytest.approx(full["weights_gb"])
    assert full["training_state_gb"] == pytest.approx(full["params"] * 16 / 1024**3)
    # FSDP shards the trained copy and its optimizer state; the frozen reference stays whole on each device
    assert sharded["reference_gb"] == pytest.approx(full["reference_gb"])
    assert sharded["weights_gb"] + sharded["training_state_gb"] == pytest.approx(
        (full["weights_gb"] + full["training_state_gb"]) / 4)
    for e in (est, full, sharded):  # what training holds on a device, before activations
        assert e["training_gb"] == pytest.approx(e["weights_gb"] + e["training_state_gb"] + e["reference_gb"]
                                                 + e["text_encoders_gb"])


def test_a_flow_run_peaks_at_the_larger_of_caption_encoding_and_training(tiny_models, pairs):
    from richpref.training.memory import GB, estimate_memory, format_estimate

    qwen = flow_config(tiny_models, pairs, "qwen-image")
    est = estimate_memory(qwen)
    stored = sum(f.stat().st_size for f in (Path(tiny_models) / "qwen-image" / "text_encoder").glob("*.safetensors"))
    # the encoders load alone (in their stored dtype) and are gone before the transformer loads
    assert est["text_encoding_gb"] == pytest.approx(stored / GB) and est["text_encoders_gb"] == 0
    assert est["text_encoding_gb"] > est["training_gb"] and est["total_gb"] == est["text_encoding_gb"]
    assert "caption encoding, before the transformer loads" in format_estimate(qwen, est, 1)
    full = estimate_memory(flow_config(tiny_models, pairs, "flux", mode="full"))
    assert full["training_gb"] > full["text_encoding_gb"] > 0 and full["total_gb"] == full["training_gb"]
    # a UNet run keeps its text encoder on the device through training
    sd15 = estimate_memory(flow_config(tiny_models, pairs, "sd15", flow=None))
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(Path(tiny_models) / "sd15" / "text_encoder").num_parameters()
    assert sd15["text_encoders_gb"] == pytest.approx(encoder * 4 / GB) and sd15["text_encoding_gb"] == 0  # float32
    assert sd15["total_gb"] == pytest.approx(sd15["training_gb"])
    assert sd15["training_gb"] == pytest.approx(sd15["weights_gb"] + sd15["training_state_gb"] + sd15["text_encoders_gb"])
