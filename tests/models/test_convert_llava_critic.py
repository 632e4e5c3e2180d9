"""`convert-llava-critic` on tiny checkpoints in LLaVA-NeXT's native `llava_qwen` layout.

The converted model is loaded through `VisionLanguageModel.load` and compared with logits computed
from the *native* tensors by a separate path written here: the Qwen2 language model and the SigLIP
tower are built from their own configs, the projector is applied by hand, and the image features are
packed (base image, then the tile grid with `image_newline` closing every row) as LLaVA-NeXT's
`spatial_unpad` does for images whose shape needs no unpadding.
"""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from richpref.models.convert_llava_critic import (
    ConversionError,
    convert_llava_critic,
    expand_pinpoints,
    map_native_key,
)
from richpref.models.tiny.llava_native import build_tiny_llava_native
from richpref.models.vlm import VisionLanguageModel

TOWER = "model.vision_tower.vision_tower.vision_model."
USED_VISION_LAYERS = 2  # the tiny native tower stores 3 layers + head; LLaVA-NeXT uses 2


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    return build_tiny_llava_native(tmp_path_factory.mktemp("native"), seed=3, extra_vision_layer=True)


@pytest.fixture(scope="module")
def converted(native_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("converted") / "llava-critic-hf"
    report = convert_llava_critic(native_dir, dst, vision_heads=2, vision_layers=USED_VISION_LAYERS)
    return dst, report


@pytest.fixture(scope="module")
def vlm(converted):
    model = VisionLanguageModel.load(str(converted[0]), device="cpu")
    yield model
    model.close()


def read_native(path) -> tuple[dict, dict]:
    config = json.loads((path / "config.json").read_text())
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, file in index.items():
        with safe_open(str(path / file), "pt") as f:
            tensors[name] = f.get_tensor(name)
    return config, tensors


def expected_name(native_key: str) -> str | None:
    """Where each native tensor must land (None: LLaVA-NeXT does not use it), written out by hand."""
    if native_key.startswith(TOWER):
        rest = native_key[len(TOWER):]
        if rest.startswith("head.") or rest.startswith(f"encoder.layers.{USED_VISION_LAYERS}."):
            return None
        return "model.vision_tower." + rest
    table = {
        "model.mm_projector.0.weight": "model.multi_modal_projector.linear_1.weight",
        "model.mm_projector.0.bias": "model.multi_modal_projector.linear_1.bias",
        "model.mm_projector.2.weight": "model.multi_modal_projector.linear_2.weight",
        "model.mm_projector.2.bias": "model.multi_modal_projector.linear_2.bias",
        "model.image_newline": "model.image_newline",
        "lm_head.weight": "lm_head.weight",
    }
    if native_key in table:
        return table[native_key]
    assert native_key.startswith("model.")
    return "model.language_model." + native_key[len("model."):]


def qwen2_from_native(config: dict, tensors: dict) -> Qwen2ForCausalLM:
    """The language model alone, from the native config and its text tensors (which are Qwen2's own names)."""
    qcfg = Qwen2Config(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]},
        tie_word_embeddings=config["tie_word_embeddings"],
    )
    lm = Qwen2ForCausalLM(qcfg).eval()
    text = {k: v for k, v in tensors.items()
            if k == "lm_head.weight" or (k.startswith("model.") and not k.startswith(("model.vision_tower.", "model.mm_projector.", "model.image_newline")))}
    if config["tie_word_embeddings"]:
        text["lm_head.weight"] = text["model.embed_tokens.weight"]
    lm.load_state_dict(text, strict=True)
    return lm


def native_image_features(tensors: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """Per-tile features as LLaVA-NeXT computes them: the last kept SigLIP layer's output, then mlp2x_gelu."""
    vcfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=USED_VISION_LAYERS,
                              num_attention_heads=2, image_size=56, patch_size=14, vision_use_head=False)
    tower = SiglipVisionModel(vcfg).eval()
    own = {k[len(TOWER):]: v for k, v in tensors.items() if k.startswith(TOWER)}
    own = {k: v for k, v in own.items() if not k.startswith(("head.", f"encoder.layers.{USED_VISION_LAYERS}."))}
    tower.load_state_dict(own, strict=True)
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True)
        feats = out.hidden_states[-1]  # before post_layernorm
        assert not torch.allclose(feats, out.last_hidden_state)
        hidden = F.gelu(feats @ tensors["model.mm_projector.0.weight"].T + tensors["model.mm_projector.0.bias"])
        return hidden @ tensors["model.mm_projector.2.weight"].T + tensors["model.mm_projector.2.bias"]


def pack(feats: torch.Tensor, rows: int, cols: int, newline: torch.Tensor) -> torch.Tensor:
    """Base image tokens, then the tiles as one grid, each grid row followed by `image_newline`."""
    side = int(feats.shape[1] ** 0.5)
    hidden = feats.shape[-1]
    tiles = feats[1:].reshape(rows, cols, side, side, hidden)
    grid = tiles.permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, hidden)
    grid = torch.cat([grid, newline.expand(rows * side, 1, hidden)], dim=1)
    return torch.cat([feats[0], grid.reshape(-1, hidden)])


def test_every_used_native_tensor_is_in_the_converted_model(native_dir, converted, vlm):
    _, tensors = read_native(native_dir)
    state = vlm.model.state_dict()
    landed = set()
    for key, value in tensors.items():
        name = expected_name(key)
        if name is None:
            continue
        assert torch.equal(state[name], value), key
        landed.add(name)
    assert landed == set(state), set(state) ^ landed
    report = converted[1]
    dropped = {k for k in tensors if expected_name(k) is None}
    assert set(report.tensors_dropped) == dropped and len(dropped) == 16 + 11  # layer 2 (16) + head (11)
    assert report.tensors_mapped == len(state)


def test_converted_config_matches_llava_next_semantics(native_dir, vlm):
    config, _ = read_native(native_dir)
    cfg = vlm.model.config
    assert cfg.model_type == "llava_onevision"
    assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "full"
    assert cfg.vision_config.num_hidden_layers == USED_VISION_LAYERS and not cfg.vision_config.vision_use_head
    assert cfg.vision_aspect_ratio == "anyres_max_9"
    assert cfg.image_grid_pinpoints == [[56, 56], [56, 112], [112, 56], [112, 112]]
    assert cfg.text_config.rope_parameters["rope_theta"] == config["rope_theta"]
    tok = vlm.tokenizer
    assert cfg.image_token_index == tok.convert_tokens_to_ids("<image>") == config["image_token_index"]
    assert list(vlm.processor.image_processor.image_mean) == [0.5, 0.5, 0.5]  # SigLIP normalisation, not CLIP's


def test_text_logits_equal_a_plain_qwen2_on_the_native_weights(native_dir, vlm):
    config, tensors = read_native(native_dir)
    lm = qwen2_from_native(config, tensors)
    ids = torch.tensor([vlm.tokenizer.encode("A red apple on a wooden table.", add_special_tokens=False)])
    with torch.no_grad():
        want = lm(input_ids=ids).logits
        got = vlm.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,grid", [((56, 56), (1, 1)), ((112, 56), (1, 2))])
def test_image_logits_equal_the_native_computation(native_dir, vlm, size, grid):
    config, tensors = read_native(native_dir)
    image = Image.fromarray(torch.randint(0, 255, (size[1], size[0], 3), generator=torch.Generator().manual_seed(1),
                                          dtype=torch.uint8).numpy())
    inputs = vlm._encode([image], ["What is wrong with this image?"])
    rows, cols = grid
    n_tiles = 1 + rows * cols
    pixel_values = inputs["pixel_values"][0, :n_tiles]
    features = pack(native_image_features(tensors, pixel_values), rows, cols, tensors["model.image_newline"])

    ids = inputs["input_ids"][0]
    image_positions = ids == config["image_token_index"]
    assert int(image_positions.sum()) == features.shape[0]  # the processor reserves exactly that many tokens
    embeds = tensors["model.embed_tokens.weight"][ids].clone()
    embeds[image_positions] = features
    lm = qwen2_from_native(config, tensors)
    with torch.no_grad():
        want = lm(inputs_embeds=embeds[None]).logits
        got = vlm.model(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_converted_model_generates_through_the_stage_code(vlm):
    image = Image.new("RGB", (80, 50), (200, 20, 20))
    [gen] = vlm.generate_detailed([image], ["Critique the image."], max_new_tokens=4)
    assert gen.new_tokens == 4
    text = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}], add_generation_prompt=True,
        tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n")


def test_tied_embeddings_and_a_full_vocabulary(tmp_path):
    """Small Qwen2 LLaVAs tie lm_head to the embeddings and may have no spare rows for <image>/<video>."""
    src = build_tiny_llava_native(tmp_path / "native", seed=5, spare_vocab_rows=0, tie_embeddings=True, shards=1)
    report = convert_llava_critic(src, tmp_path / "hf", vision_heads=2)
    assert report.vocab_rows_added == 2 and report.tensors_dropped == []
    config, tensors = read_native(src)
    vlm = VisionLanguageModel.load(str(tmp_path / "hf"), device="cpu")
    try:
        embed = tensors["model.embed_tokens.weight"]
        state = vlm.model.state_dict()
        rows = embed.shape[0]
        assert torch.equal(state["lm_head.weight"][:rows], embed)
        torch.testing.assert_close(state["model.language_model.embed_tokens.weight"][rows:], embed.mean(0).expand(2, -1))
        ids = torch.tensor([vlm.tokenizer.encode("Two dogs near a lake.", add_special_tokens=False)])
        with torch.no_grad():
            want = qwen2_from_native(config, tensors)(input_ids=ids).logits
            got = vlm.model(input_ids=ids).logits[..., :rows]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        vlm.close()


def test_refusals_name_the_problem(native_dir, converted, tmp_path):
    with pytest.raises(ConversionError, match="--vision-heads"):
        convert_llava_critic(native_dir, tmp_path / "a")
    with pytest.raises(ConversionError, match="not empty"):
        convert_llava_critic(native_dir, converted[0], vision_heads=2)
    with pytest.raises(ConversionError, match="needs no conversion"):
        convert_llava_critic(converted[0], tmp_path / "b", vision_heads=2)
    with pytest.raises(ConversionError, match="not part of the LLaVA-NeXT"):
        map_native_key("model.vision_resampler.weight", 2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pinpoint_ranges_expand_in_tiles():
    assert expand_pinpoints("(1x1),...,(2x3)", 384) == [[384, 384], [384, 768], [384, 1152],
                                                         [768, 384], [768, 768], [768, 1152]]
    assert expand_pinpoints([[384, 768]], 384) == [[384, 768]]


def test_cli_converts(native_dir, tmp_path):
    from richpref.cli.commands import main

    dst = tmp_path / "cli"
    assert main(["models", "convert-llava-critic", str(native_dir), str(dst), "--vision-heads", "2",
                 "--vision-layers", str(USED_VISION_LAYERS)]) == 0
    assert json.loads((dst / "richpref_conversion.json").read_text())["vision_layers"] == USED_VISION_LAYERS
    assert main(["models", "convert-llava-critic", str(native_dir), str(tmp_path / "x")]) == 2


def test_loading_a_native_checkpoint_points_at_the_converter(native_dir):
    with pytest.raises(ValueError, match="convert-llava-critic"):
        VisionLanguageModel.load(str(native_dir), device="cpu")
