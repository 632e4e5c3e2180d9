"""What HPSv3 and EditReward share: a Qwen-VL with a `<|Reward|>` token and MLP heads on its hidden state.

Both references (HPSv3 `hpsv3/model/qwen2vl_trainer.py`, EditReward `EditReward/model/qwen2_5_vl_trainer.py`)
subclass the transformers VLM, add the special token `<|Reward|>` to the base model's tokenizer
(embeddings resized to the new tokenizer length, right padding), and read a score off the last
hidden state at that token:

- images: RGB, resized with PIL bicubic to the size `smart_size` gives for exactly 256·28·28 pixels
  (both sides multiples of 28), then through the base model's processor and chat template
  (generation prompt added);
- positions: the references embed the images themselves and call the text model with no position
  ids, so every token gets its plain index on all three M-RoPE axes (not the image-grid positions
  the VLM uses when it generates). richpref passes those positions explicitly;
- head (`ranknet`, no `rm_head_kwargs`): Linear(hidden, 1024), ReLU, Dropout, Linear(1024, 16), ReLU,
  Linear(16, 2) in float32 on the hidden state; its two outputs are (mu, log-sigma) and the score is mu.

Checkpoints are whole state dicts (`HPSv3.safetensors`, EditReward's `model.safetensors`) in the
transformers layout their code was trained with; the legacy layout (`model.layers…`, `visual…`) of
transformers < 4.52 is mapped to today's (`model.language_model.layers…`, `model.visual…`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from PIL import Image

from ...prompts import REWARD_TOKEN
from ..runtime import resolve_device, resolve_dtype
from .base import RewardLoadError, checkpoint_file, load_state_dict, load_strict, subdict

FACTOR = 28  # patch 14 x spatial merge 2
PIXELS = 256 * 28 * 28  # the references' min_pixels = max_pixels
MAX_RATIO = 200
HEAD_LINEAR_AT = (0, 3, 5)  # Linear, ReLU, Dropout, Linear, ReLU, Linear


def smart_size(height: int, width: int, pixels: int = PIXELS, factor: int = FACTOR,
               min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """(h, w), multiples of `factor`, with the aspect ratio kept and h·w brought into [min_pixels,
    max_pixels] (both `pixels` unless given: min = max, as the reward references ask), as qwen_vl_utils'
    smart_resize does: round each side, then scale down (floor) when over, up (ceil) when under."""
    lo, hi = min_pixels or pixels, max_pixels or pixels
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"image of {width}x{height}: aspect ratio over {MAX_RATIO}, which Qwen-VL refuses")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > hi:
        s = math.sqrt(height * width / hi)
        h, w = math.floor(height / s / factor) * factor, math.floor(width / s / factor) * factor
    elif h * w < lo:
        s = math.sqrt(lo / (height * width))
        h, w = math.ceil(height * s / factor) * factor, math.ceil(width * s / factor) * factor
    return h, w


def fit_image(image: Image.Image, pixels: int = PIXELS) -> Image.Image:
    image = image.convert("RGB")
    h, w = smart_size(image.height, image.width, pixels)
    return image.resize((w, h), Image.BICUBIC)


def modern_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers < 4.52 names (`model.layers…`, `visual…`) -> today's (`model.language_model…`, `model.visual…`)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.language_model.", "model.visual.")):
            k = "model.language_model." + k[len("model."):]
        out[k] = v
    return out


class RankNetHead(torch.nn.Module):
    """The references' default `ranknet` head; sizes read from the checkpoint."""

    def __init__(self, sd: dict[str, torch.Tensor], what: str) -> None:
        super().__init__()
        try:
            shapes = [tuple(sd[f"{i}.weight"].shape) for i in HEAD_LINEAR_AT]
        except KeyError as exc:
            raise RewardLoadError(f"{what}: no head weight {exc.args[0]!r}; expected Linear layers at "
                                  f"{HEAD_LINEAR_AT} (keys found: {sorted(sd)[:8]})") from None
        (h1, d), (h2, _), (o, _) = shapes
        self.layers = torch.nn.Sequential(torch.nn.Linear(d, h1), torch.nn.ReLU(), torch.nn.Identity(),
                                          torch.nn.Linear(h1, h2), torch.nn.ReLU(), torch.nn.Linear(h2, o))
        load_strict(self.layers, sd, what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.float())


class QwenHeadReward:
    """The backbone, processor and heads of a `<|Reward|>`-token Qwen-VL reward.

    `path`: the reward checkpoint (a file, a dir holding `file`, or a Hub repo); `backbone`: the base
    VLM it was trained from (config, tokenizer, processor: `Qwen/Qwen2-VL-7B-Instruct`, …)."""

    model_type: str = ""  # qwen2_vl | qwen2_5_vl
    head_prefixes: tuple[str, ...] = ()

    def __init__(self, path: str, *, backbone: str, file: str, device: str = "auto", dtype: str = "auto") -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

        self.model_id = path
        self.device = resolve_device(device)
        # The references run the VLM in bfloat16: 'auto' picks it on GPU, float32 on CPU.
        self.dtype = torch.bfloat16 if dtype == "auto" and self.device.type == "cuda" else resolve_dtype(dtype, self.device)
        what = f"{type(self).__name__} {path}"
        try:
            config = AutoConfig.from_pretrained(backbone)
            self.processor = AutoProcessor.from_pretrained(backbone, padding_side="right")
            # The references ran the PIL/numpy image processor (the only one before transformers 4.47).
            self.processor.image_processor = AutoImageProcessor.from_pretrained(backbone, backend="pil")
        except (OSError, ValueError) as exc:
            raise RewardLoadError(f"{what}: cannot load its base model {backbone!r} ({exc}); set the reward's "
                                  f"`backbone:` to the Qwen-VL it was trained from (a local dir or Hub id)") from exc
        if config.model_type != self.model_type:
            raise RewardLoadError(f"{what}: backbone {backbone!r} is a {config.model_type!r}, this reward needs {self.model_type!r}")
        tok = self.processor.tokenizer
        tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_id = tok.convert_tokens_to_ids(REWARD_TOKEN)
        self.pad_id = tok.pad_token_id
        sd = modern_keys(load_state_dict(checkpoint_file(path, file)))
        heads = {p: subdict(sd, f"{p}.") for p in self.head_prefixes}
        body = {k: v for k, v in sd.items() if not any(k.startswith(f"{p}.") for p in self.head_prefixes)}
        emb = body.get("model.language_model.embed_tokens.weight")
        if emb is None:
            raise RewardLoadError(f"{what}: no token embeddings (model.embed_tokens.weight) in the checkpoint; "
                                  "is it a whole reward-model state dict?")
        if emb.shape[0] < len(tok):
            raise RewardLoadError(f"{what}: the checkpoint embeds {emb.shape[0]} tokens but the tokenizer of "
                                  f"{backbone!r} with {REWARD_TOKEN} has {len(tok)}: wrong backbone?")
        config.text_config.vocab_size = emb.shape[0]
        self.model = self._build(config, body, what)
        self.heads = torch.nn.ModuleList(RankNetHead(heads[p], f"{what} head {p}") for p in self.head_prefixes)
        self.heads.to(self.device).eval()

    def _build(self, config, sd: dict[str, torch.Tensor], what: str):
        from transformers import AutoModelForImageTextToText
        from transformers.initialization import no_init_weights

        cls = AutoModelForImageTextToText._model_mapping[type(config)]
        with no_init_weights():
            model = cls._from_config(config, dtype=self.dtype, attn_implementation="sdpa")
        load_strict(model, {k: v.to(self.dtype) for k, v in sd.items()}, what)
        return model.to(self.device).eval()

    def render(self, images: Sequence[Image.Image], text: str) -> str:
        conv = [{"role": "user", "content": [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def run(self, texts: list[str], images: list[Image.Image], head: int) -> torch.Tensor:
        """(B, 2) head outputs at the reward token of each text (its images in order, already fitted)."""
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        at = ids == self.reward_id
        if not bool((at.sum(-1) == 1).all()):
            raise RuntimeError(f"each text must hold {REWARD_TOKEN} once (counts {at.sum(-1).tolist()})")
        positions = torch.arange(ids.shape[1], device=self.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
        out = self.model.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               pixel_values=batch["pixel_values"].to(self.device, self.dtype),
                               image_grid_thw=batch["image_grid_thw"].to(self.device), use_cache=False)
        return self.heads[head](out.last_hidden_state[at])

    def close(self) -> None:
        self.model = None
