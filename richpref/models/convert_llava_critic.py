"""Convert a LLaVA-NeXT native `llava_qwen` checkpoint to transformers' LLaVA-OneVision layout.

The official LLaVA-Critic (`lmms-lab/llava-critic-7b`, like the LLaVA-OneVision-Qwen2 checkpoints it
was tuned from) is saved by the LLaVA-NeXT code base: a Qwen2 causal LM whose `model` also holds the
SigLIP vision tower, the `mlp2x_gelu` projector and the `image_newline` vector. transformers cannot
load it, but `LlavaOnevisionForConditionalGeneration` is the same network, so the conversion is a
renaming of tensors plus a config and a processor:

    native key (LLaVA-NeXT)                                  -> transformers (in-memory state dict)
    model.embed_tokens / model.layers.N / model.norm         -> model.language_model.…
    lm_head.weight                                           -> lm_head.weight
    model.vision_tower.vision_tower.vision_model.X           -> model.vision_tower.X
    model.mm_projector.0 / model.mm_projector.2              -> model.multi_modal_projector.linear_1 / linear_2
    model.image_newline                                      -> model.image_newline

LLaVA-NeXT drops the SigLIP tower's last encoder layer and its pooling head when it builds the model
and takes the last remaining layer's output (before `post_layernorm`) as image features; transformers
gets the same features from a tower of that many layers with `vision_feature_layer=-1` and
`vision_feature_select_strategy="full"`. Tensors of a dropped layer or of the head, if the checkpoint
has them, are left out. The `<image>`/`<video>` placeholders LLaVA-NeXT never tokenised are added to
the tokenizer; a Qwen2 vocabulary has spare embedding rows for them, else rows are appended (the mean
embedding: the placeholders' embeddings are replaced by image features and never read).
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("richpref")

# What the weights cannot tell about a vision tower: heads (head_dim is not stored), its full depth
# (LLaVA-NeXT uses depth - 1 layers), norm epsilon, activation and the image normalisation.
KNOWN_TOWERS = {
    "google/siglip-so400m-patch14-384": dict(num_attention_heads=16, depth=27, layer_norm_eps=1e-6,
                                             hidden_act="gelu_pytorch_tanh", image_mean=[0.5] * 3, image_std=[0.5] * 3),
}
SIGLIP_DEFAULTS = dict(layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", image_mean=[0.5] * 3, image_std=[0.5] * 3)

_TOWER = "model.vision_tower.vision_tower.vision_model."
_VISION_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
_NATIVE_ARCHS = ("LlavaQwenForCausalLM",)

# LLaVA-OneVision-Qwen2's conversation format ("qwen_1_5" in LLaVA-NeXT): ChatML with a default
# system turn and each image as "<image>\n" ahead of the user's text.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}{{- '<video>\\n' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class ConversionError(ValueError):
    """A source checkpoint this converter cannot convert faithfully; the message says why and what to do."""


@dataclass
class ConversionReport:
    src: str
    dst: str
    tensors_mapped: int = 0
    tensors_dropped: list[str] = field(default_factory=list)
    vision_layers: int = 0
    image_token_id: int = 0
    video_token_id: int = 0
    vocab_rows_added: int = 0
    dtype: str = ""
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- reading


def read_native_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src}: no config.json; give the directory of a LLaVA-NeXT llava_qwen checkpoint")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    if not (set(archs) & set(_NATIVE_ARCHS) or cfg.get("model_type") == "llava_qwen"):
        raise ConversionError(
            f"{src}: architectures {archs} / model_type {cfg.get('model_type')!r} is not a LLaVA-NeXT Qwen2 "
            f"checkpoint ({_NATIVE_ARCHS[0]}); a transformers-format model needs no conversion")
    for key, want in (("mm_projector_type", "mlp2x_gelu"), ("mm_patch_merge_type", "spatial_unpad")):
        if cfg.get(key, want) != want:
            raise ConversionError(f"{src}: {key}={cfg[key]!r}; only {want!r} has a LLaVA-OneVision equivalent")
    if "siglip" not in str(cfg.get("mm_vision_tower", "siglip")).lower():
        raise ConversionError(f"{src}: vision tower {cfg['mm_vision_tower']!r} is not SigLIP; only SigLIP towers convert")
    return cfg


def weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors (single or sharded) preferred, else PyTorch .bin."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = src / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [src / n for n in names]
        files = sorted(src.glob(pattern))
        if files:
            return files
    raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weight files")


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        dup = set(part) & set(out)
        if dup:
            raise ConversionError(f"{f}: tensor(s) {sorted(dup)[:3]} also appear in another weight file")
        out.update(part)
    return out


# ---------------------------------------------------------------------------------------- mapping


def map_native_key(key: str, vision_layers: int) -> str | None:
    """transformers name of a native tensor, or None for tensors LLaVA-NeXT does not use.

    Raises ConversionError for a key this layout does not know, so nothing is dropped silently.
    """
    if key.endswith("rotary_emb.inv_freq"):
        return None  # recomputed from the config
    if key == "lm_head.weight":
        return key
    if key.startswith(_TOWER):
        rest = key[len(_TOWER):]
        if rest.startswith("head."):
            return None  # the pooling head: replaced by Identity in LLaVA-NeXT
        m = _VISION_LAYER.match(rest)
        if m and int(m.group(1)) >= vision_layers:
            return None  # a layer LLaVA-NeXT deletes
        if rest.startswith(("embeddings.", "encoder.layers.", "post_layernorm.")):
            return "model.vision_tower." + rest
    m = re.match(r"^model\.mm_projector\.([02])\.(weight|bias)$", key)
    if m:
        return f"model.multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    if key == "model.image_newline":
        return key
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "model.language_model." + key[len("model."):]
    raise ConversionError(f"tensor {key!r} is not part of the LLaVA-NeXT llava_qwen layout this converter knows")


def expand_pinpoints(value, tile: int) -> list[list[int]]:
    """`image_grid_pinpoints` as [[h, w], …]: a list is kept, "(1x1),...,(6x6)" is expanded in tiles."""
    if isinstance(value, str):
        found = re.findall(r"\((\d+)x(\d+)\)", value)
        if len(found) < 2:
            raise ConversionError(f"image_grid_pinpoints {value!r}: expected a list or a range like '(1x1),...,(6x6)'")
        (r0, c0), (r1, c1) = (tuple(map(int, found[0])), tuple(map(int, found[-1])))
        return [[r * tile, c * tile] for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
    return [[int(h), int(w)] for h, w in value]


def vision_layout(tensors: dict[str, torch.Tensor], native: dict, vision_heads: int | None,
                  vision_layers: int | None) -> dict:
    """SigLIP dimensions from the tensors, plus what the tensors cannot tell (heads, depth used)."""
    try:
        patch = tensors[_TOWER + "embeddings.patch_embedding.weight"]
        positions = tensors[_TOWER + "embeddings.position_embedding.weight"]
        fc1 = tensors[_TOWER + "encoder.layers.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise ConversionError(f"the checkpoint has no vision tower tensor {exc.args[0]!r}") from None
    side = int(round(positions.shape[0] ** 0.5))
    if side * side != positions.shape[0]:
        raise ConversionError(f"{positions.shape[0]} vision positions is not a square grid")
    present = sorted({int(m.group(1)) for k in tensors if k.startswith(_TOWER)
                      for m in [_VISION_LAYER.match(k[len(_TOWER):])] if m})
    known = KNOWN_TOWERS.get(native.get("mm_vision_tower", ""), {})
    heads = vision_heads or known.get("num_attention_heads")
    if not heads:
        raise ConversionError(
            f"vision tower {native.get('mm_vision_tower')!r} is unknown and its attention heads cannot be read "
            "from the weights; pass --vision-heads N (so400m: 16)")
    if vision_layers is None:
        # LLaVA-NeXT uses depth - 1 layers; unknown towers: trust the checkpoint to hold exactly those.
        vision_layers = known["depth"] - 1 if known else len(present)
    if present != list(range(len(present))) or len(present) < vision_layers:
        raise ConversionError(f"vision tower layers {present[:3]}…{present[-3:]} in the checkpoint; "
                              f"{vision_layers} consecutive layers from 0 are needed")
    hidden = patch.shape[0]
    if hidden % heads:
        raise ConversionError(f"vision hidden size {hidden} is not divisible by {heads} heads")
    extras = {k: known.get(k, SIGLIP_DEFAULTS[k]) for k in SIGLIP_DEFAULTS}
    return dict(hidden_size=hidden, intermediate_size=fc1.shape[0], num_hidden_layers=vision_layers,
                num_attention_heads=heads, patch_size=patch.shape[-1], image_size=side * patch.shape[-1],
                num_channels=patch.shape[1], **extras)


def text_config_kwargs(native: dict, vocab_rows: int) -> dict:
    """Qwen2 config fields from the native config (it *is* a Qwen2Config plus LLaVA fields)."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "hidden_act", "max_position_embeddings", "rms_norm_eps", "use_sliding_window", "sliding_window",
            "max_window_layers", "attention_dropout", "bos_token_id", "eos_token_id", "initializer_range")
    missing = [k for k in keys[:5] if k not in native]
    if missing:
        raise ConversionError(f"config.json lacks {missing}")
    kw = {k: native[k] for k in keys if k in native}
    if native.get("rope_scaling"):
        raise ConversionError(f"rope_scaling={native['rope_scaling']!r} is not supported (LLaVA-NeXT sets it to None)")
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(native.get("rope_theta", 10000.0))}
    kw["vocab_size"] = vocab_rows
    kw["tie_word_embeddings"] = False  # lm_head is always written (cloned from the embeddings when tied)
    return kw


# ---------------------------------------------------------------------------------------- convert


def convert_llava_critic(src: str | Path, dst: str | Path, *, dtype: str = "keep", vision_heads: int | None = None,
                         vision_layers: int | None = None, max_shard_size: str = "5GB") -> ConversionReport:
    """Convert the native checkpoint directory `src` into a transformers model + processor in `dst`.

    `dtype`: "keep" (the checkpoint's), "float32", "float16" or "bfloat16". `vision_heads` and
    `vision_layers` override what is known or inferred about the vision tower. Returns a report,
    also written as `dst/richpref_conversion.json`.
    """
    from transformers import (
        AddedToken,
        AutoTokenizer,
        GenerationConfig,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory; download the checkpoint first "
                              "(huggingface-cli download lmms-lab/llava-critic-7b --local-dir DIR)")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty; choose a new directory")
    report = ConversionReport(src=str(src), dst=str(dst))
    native = read_native_config(src)
    tensors = load_tensors(weight_files(src))

    vision = vision_layout(tensors, native, vision_heads, vision_layers)
    report.vision_layers = vision["num_hidden_layers"]
    image_mean, image_std = vision.pop("image_mean"), vision.pop("image_std")
    if "mm_hidden_size" in native and native["mm_hidden_size"] != vision["hidden_size"]:
        raise ConversionError(f"mm_hidden_size={native['mm_hidden_size']} but the tower's hidden size is {vision['hidden_size']}")

    # Tokenizer: add the placeholders LLaVA-NeXT spliced in as ids, not tokens.
    with warnings.catch_warnings():
        # AutoTokenizer reads config.json, whose LLaVA-NeXT `rope_scaling: null` transformers flags as deprecated.
        warnings.simplefilter("ignore", FutureWarning)
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    for tok in ("<image>", "<video>"):
        if tok not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(tok, special=True, normalized=False)], special_tokens=True)
    image_id, video_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<video>")
    if native.get("image_token_index") not in (None, image_id):
        report.notes.append(f"config.json says image_token_index={native['image_token_index']}; the tokenizer gives "
                            f"<image> id {image_id}, which the converted config and processor use")
    report.image_token_id, report.video_token_id = image_id, video_id

    # Rename, drop what LLaVA-NeXT does not use, and check every target exists exactly once.
    mapped: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = map_native_key(key, vision["num_hidden_layers"])
        if name is None:
            report.tensors_dropped.append(key)
        else:
            mapped[name] = value
    del tensors
    embed_key, head_key = "model.language_model.embed_tokens.weight", "lm_head.weight"
    if embed_key not in mapped:
        raise ConversionError("the checkpoint has no model.embed_tokens.weight")
    if head_key not in mapped:
        mapped[head_key] = mapped[embed_key].clone()  # tied embeddings (small Qwen2 models)
        report.notes.append("lm_head.weight absent (tied embeddings): written as a copy of the input embeddings")
    rows = mapped[embed_key].shape[0]
    needed = max(image_id, video_id, len(tokenizer) - 1) + 1
    if needed > rows:
        for key in (embed_key, head_key):
            w = mapped[key]
            mapped[key] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(needed - rows, -1)])
        report.vocab_rows_added = needed - rows
        rows = needed

    target_dtype = mapped[embed_key].dtype if dtype == "keep" else getattr(torch, dtype)
    report.dtype = str(target_dtype).replace("torch.", "")
    tile = vision["image_size"]
    pinpoints = expand_pinpoints(native.get("image_grid_pinpoints") or [[tile, tile]], tile)
    aspect = native.get("image_aspect_ratio", "anyres_max_9")
    config = LlavaOnevisionConfig(
        text_config=Qwen2Config(**text_config_kwargs(native, rows)).to_dict(),
        vision_config=SiglipVisionConfig(**vision, vision_use_head=False).to_dict(),
        image_token_index=image_id,
        video_token_index=video_id,
        projector_hidden_act="gelu",  # mlp2x_gelu: Linear, GELU (exact), Linear
        multimodal_projector_bias=True,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=aspect,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    config.dtype = target_dtype
    with torch.device("meta"):  # no random init of billions of weights: every tensor is assigned below
        model = LlavaOnevisionForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or unexpected:
        raise ConversionError(f"mapped tensors do not match LlavaOnevisionForConditionalGeneration "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}); is the checkpoint complete?")
    for name, param in model.state_dict().items():
        if tuple(mapped[name].shape) != tuple(param.shape):
            raise ConversionError(f"{name}: checkpoint shape {tuple(mapped[name].shape)} != expected {tuple(param.shape)}")
    model.load_state_dict({k: v.to(target_dtype) for k, v in mapped.items()}, strict=True, assign=True)
    report.tensors_mapped = len(mapped)

    eos = [i for i in (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
           if i is not None and i != tokenizer.unk_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(eos_token_id=eos or native.get("eos_token_id"), pad_token_id=pad,
                                               bos_token_id=native.get("bos_token_id"), do_sample=False)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst), max_shard_size=max_shard_size)
    del model, mapped

    size = {"height": tile, "width": tile}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_mean=image_mean, image_std=image_std,
                                                     image_grid_pinpoints=pinpoints, do_pad=True),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size, image_mean=image_mean, image_std=image_std),
        num_image_tokens=(tile // vision["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(dst))
    (dst / "richpref_conversion.json").write_text(json.dumps(asdict(report), indent=2))
    log.info("converted %s -> %s: %d tensors, %d dropped, vision layers %d, dtype %s", src, dst,
             report.tensors_mapped, len(report.tensors_dropped), report.vision_layers, report.dtype)
    return report


__all__ = ["ConversionError", "ConversionReport", "KNOWN_TOWERS", "CHAT_TEMPLATE", "convert_llava_critic",
           "expand_pinpoints", "map_native_key"]
