"""Tiny random-weight reward models in the ORIGINAL checkpoint layouts, built offline and seeded.

Each builder writes what the real release ships, with the same file names and state-dict keys and
much smaller sizes, so the tiny profile and the tests load them through the real loaders:

| builder | files (as released) |
|---|---|
| `build_tiny_imagereward` | `ImageReward.pt` (keys `blip.visual_encoder.*`, `blip.text_encoder.*`, `blip.{vision,text}_proj.*`, `mlp.layers.{0,2,4,6,7}.*`), `med_config.json`; plus `tokenizer/` standing in for bert-base-uncased |
| `build_tiny_hps` | `HPS_v2.1_compressed.pt` and `HPS_v2_compressed.pt` (`{'state_dict': open_clip CLIP}`), `open_clip_config.json` (the real one uses open_clip's built-in ViT-H-14 config) |
| `build_tiny_aesthetic_head` | `sac+logos+ava1-l14-linearMSE.pth` (keys `layers.{0,2,4,6,7}.*`) |
| `build_tiny_ict` | `pytorch_model.bin` (a CLIPModel state dict, laid over the backbone) |
| `build_tiny_hp` | `hp_backbone/pytorch_model.bin`, `hp_scorer/mlp_pytorch_model.bin` |
| `build_tiny_dinov2` | `save_pretrained` of `Dinov2Model` + its image processor |

The ImageReward state dict is generated from BLIP's key names directly (not from transformers'
modules), so the loader's name mapping is tested, not assumed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

IR_VISION = dict(width=128, depth=2, mlp=256, patch=16, image=32)  # 128/64 = 2 heads, as BLIP's 64-wide heads
IR_TEXT = dict(hidden=32, layers=2, heads=4, intermediate=64, max_positions=40)
IR_HEAD = (32, 24, 16, 8, 4, 1)  # real: 768, 1024, 128, 64, 16, 1
CLIP_HEAD = (16, 24, 16, 8, 4, 1)  # over the tiny CLIP's 16-d projection; real: 768 (L/14) or 1024 (H/14) in


def _rand(gen: torch.Generator, *shape: int, fan_in: int | None = None) -> torch.Tensor:
    std = 1.0 / (fan_in ** 0.5) if fan_in else 0.02
    return torch.randn(*shape, generator=gen) * std


def _norm(gen: torch.Generator, prefix: str, dim: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1.0 + 0.1 * torch.randn(dim, generator=gen), f"{prefix}.bias": 0.1 * torch.randn(dim, generator=gen)}


def _linear(gen: torch.Generator, prefix: str, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": _rand(gen, out_f, in_f, fan_in=in_f), f"{prefix}.bias": 0.1 * torch.randn(out_f, generator=gen)}


def linear_head_state(gen: torch.Generator, dims: tuple[int, ...], prefix: str = "") -> dict[str, torch.Tensor]:
    sd = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        sd.update(_linear(gen, f"{prefix}layers.{idx}", o, i))
    return sd


def blip_vit_state(gen: torch.Generator, width: int, depth: int, mlp: int, patch: int, image: int) -> dict[str, torch.Tensor]:
    """BLIP's ViT (models/vit.py, timm names): cls_token, pos_embed, patch_embed.proj, blocks.N.*, norm."""
    n_tokens = (image // patch) ** 2 + 1
    sd = {"cls_token": _rand(gen, 1, 1, width, fan_in=width), "pos_embed": _rand(gen, 1, n_tokens, width, fan_in=width),
          "patch_embed.proj.weight": _rand(gen, width, 3, patch, patch, fan_in=3 * patch * patch),
          "patch_embed.proj.bias": 0.1 * torch.randn(width, generator=gen)}
    for i in range(depth):
        b = f"blocks.{i}"
        sd.update(_norm(gen, f"{b}.norm1", width))
        sd.update(_linear(gen, f"{b}.attn.qkv", 3 * width, width))
        sd.update(_linear(gen, f"{b}.attn.proj", width, width))
        sd.update(_norm(gen, f"{b}.norm2", width))
        sd.update(_linear(gen, f"{b}.mlp.fc1", mlp, width))
        sd.update(_linear(gen, f"{b}.mlp.fc2", width, mlp))
    sd.update(_norm(gen, "norm", width))
    return sd


def blip_bert_state(gen: torch.Generator, vocab: int, hidden: int, layers: int, intermediate: int, max_positions: int,
                    encoder_width: int, **_) -> dict[str, torch.Tensor]:
    """BLIP's med.py BertModel (no pooler): embeddings + layers with attention and crossattention."""
    sd = {"embeddings.word_embeddings.weight": torch.randn(vocab, hidden, generator=gen),
          "embeddings.position_embeddings.weight": 0.5 * torch.randn(max_positions, hidden, generator=gen),
          "embeddings.position_ids": torch.arange(max_positions).unsqueeze(0)}
    sd.update(_norm(gen, "embeddings.LayerNorm", hidden))
    for i in range(layers):
        l = f"encoder.layer.{i}"
        for block, kv_width in (("attention", hidden), ("crossattention", encoder_width)):
            sd.update(_linear(gen, f"{l}.{block}.self.query", hidden, hidden))
            sd.update(_linear(gen, f"{l}.{block}.self.key", hidden, kv_width))
            sd.update(_linear(gen, f"{l}.{block}.self.value", hidden, kv_width))
            sd.update(_linear(gen, f"{l}.{block}.output.dense", hidden, hidden))
            sd.update(_norm(gen, f"{l}.{block}.output.LayerNorm", hidden))
        sd.update(_linear(gen, f"{l}.intermediate.dense", intermediate, hidden))
        sd.update(_linear(gen, f"{l}.output.dense", hidden, intermediate))
        sd.update(_norm(gen, f"{l}.output.LayerNorm", hidden))
    return sd


def tiny_bert_tokenizer(out_dir: Path):
    """A WordPiece tokenizer standing in for bert-base-uncased: the demo prompts' words, letters and
    `##`-letters, BERT's special tokens at BERT's ids. Saved plain, without BLIP's added tokens."""
    from transformers import BertTokenizer

    words = sorted(set(re.findall(r"[a-z]+", (Path(__file__).parents[2] / "data" / "demo_prompts.txt").read_text().lower())))
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(letters) + list(".,!?'-:;\"()") + [f"##{c}" for c in letters] + words
    vocab = list(dict.fromkeys(vocab))
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_imagereward(out_dir, seed: int = 0) -> Path:
    from ..rewards.imagereward import blip_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiny_bert_tokenizer(out / "tokenizer")
    vocab = len(blip_tokenizer(str(out / "tokenizer")))  # + [DEC], [ENC], like the real 30522 + 2
    gen = torch.Generator().manual_seed(seed)
    v = IR_VISION
    sd = {f"blip.visual_encoder.{k}": t for k, t in blip_vit_state(gen, v["width"], v["depth"], v["mlp"], v["patch"], v["image"]).items()}
    sd.update({f"blip.text_encoder.{k}": t for k, t in
               blip_bert_state(gen, vocab=vocab, encoder_width=v["width"], **IR_TEXT).items()})
    sd.update(_linear(gen, "blip.vision_proj", 16, v["width"]))
    sd.update(_linear(gen, "blip.text_proj", 16, IR_TEXT["hidden"]))
    sd.update(linear_head_state(gen, IR_HEAD, prefix="mlp."))
    torch.save(sd, out / "ImageReward.pt")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": IR_TEXT["hidden"], "initializer_range": 0.02,
           "intermediate_size": IR_TEXT["intermediate"], "layer_norm_eps": 1e-12,
           "max_position_embeddings": IR_TEXT["max_positions"], "model_type": "bert",
           "num_attention_heads": IR_TEXT["heads"], "num_hidden_layers": IR_TEXT["layers"], "pad_token_id": 0,
           "type_vocab_size": 2, "vocab_size": vocab,
           "encoder_width": 768,  # as in the real file: BLIP_Pretrain replaces it with the ViT's width
           "add_cross_attention": True}
    (out / "med_config.json").write_text(json.dumps(med, indent=2))
    return out


TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def build_tiny_hps(out_dir, seed: int = 0) -> Path:
    import open_clip

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")):  # v2.1 and v2.0: two checkpoints
        torch.manual_seed(seed + 100 * k)
        model = open_clip.CLIP(**TINY_OPEN_CLIP)
        torch.save({"state_dict": model.state_dict()}, out / name)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}, indent=2))
    return out


def build_tiny_aesthetic_head(out_dir, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.save(linear_head_state(gen, CLIP_HEAD), out / "sac+logos+ava1-l14-linearMSE.pth")
    return out


def _clip_state_like(backbone: Path, seed: int) -> dict[str, torch.Tensor]:
    """A differently-seeded CLIPModel with the backbone's config: a 'fine-tuned' copy's state dict."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig.from_pretrained(backbone)).state_dict()


def build_tiny_ict(out_dir, backbone, seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(_clip_state_like(Path(backbone), seed), out / "pytorch_model.bin")
    return out


def build_tiny_hp(out_dir, backbone, seed: int = 0) -> Path:
    out = Path(out_dir)
    (out / "hp_backbone").mkdir(parents=True, exist_ok=True)
    (out / "hp_scorer").mkdir(parents=True, exist_ok=True)
    torch.save(_clip_state_like(Path(backbone), seed), out / "hp_backbone" / "pytorch_model.bin")
    gen = torch.Generator().manual_seed(seed + 1)
    torch.save(linear_head_state(gen, CLIP_HEAD), out / "hp_scorer" / "mlp_pytorch_model.bin")
    return out


def build_tiny_dinov2(out_dir, seed: int = 0) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    out = Path(out_dir)
    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=14,
                       image_size=56)
    Dinov2Model(cfg).eval().save_pretrained(out)
    # DINOv2's processor (ImageNet mean/std); patch consistency reads only its mean/std.
    BitImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    return out
