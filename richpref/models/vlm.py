"""Vision-language model backend shared by real critics and the tiny test models.

One class drives any transformers image-text-to-text checkpoint with a chat template: Qwen2.5-VL,
LLaVA-OneVision (the LLaVA-Critic architecture, transformers format) and the tiny random models from
`richpref.models.tiny.vlm`. Three ways of asking a question about an image:

- `generate` / `generate_detailed`: free text (critiques, edit instructions), greedy; the detailed
  form also says whether the model finished or was cut off at `max_new_tokens`;
- `option_probabilities`: probability of each of a few answers (e.g. "Yes"/"No") read from the
  logits at the answer position, without generating; an answer may have several spellings
  ("Yes", "yes", " Yes") whose probabilities are summed; `p_yes` is the yes/no special case;
- `expected_score`: PortraitRL §3.2 — the probability-weighted score over the digit tokens of a
  rating scale, normalised to [0, 1]; smoother and better calibrated than the argmax digit.

Every item is one user turn `[image, text]` rendered with the processor's chat template and
`add_generation_prompt=True`. Batches are left-padded so that every row's answer position is the
last input position, which makes results independent of the batch composition (up to float noise).
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .runtime import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

# An answer option: one string, or several spellings of the same answer whose probabilities add up.
Option = Union[str, Sequence[str]]
# Spellings a chat model starts a yes/no answer with; real Qwen2 vocabularies have each as one token.
YES_NO: tuple[tuple[str, ...], tuple[str, ...]] = (("Yes", "yes", " Yes", " yes"), ("No", "no", " No", " no"))


@dataclass(frozen=True)
class Generation:
    """One generated answer: its text, whether the model ended it itself, and its length in tokens."""

    text: str
    finished: bool  # an end-of-sequence token came before max_new_tokens ran out
    new_tokens: int  # tokens generated, the end-of-sequence token excluded
    error: str | None = None  # `code: detail` when a served request failed for good (text is then "")


@dataclass(frozen=True)
class YesNo:
    """One yes/no answer: P(yes), and where it came from.

    source: "logits" (in-process, softmax at the answer position), "logprobs" (a server's top
    logprobs of the answer token) or "answer" (a server's one-token answer: p is exactly 0 or 1).
    """

    p: float | None
    source: str
    error: str | None = None  # `code: detail` when no answer could be had (p is then None)


def expected_score_from_probs(probs: np.ndarray, values: Sequence[float]) -> np.ndarray:
    """Expected value of a rating scale, normalised to [0, 1].

    `probs[..., k]` is the (possibly unnormalised) probability of `values[k]`. Rows are renormalised
    over the given values, E = sum_k values[k] p_k, and the result is
    (E - min(values)) / (max(values) - min(values)). Shape: `probs.shape[:-1]`.
    """
    p = np.asarray(probs, dtype=np.float64)
    v = np.asarray(list(values), dtype=np.float64)
    if p.shape[-1] != v.shape[0]:
        raise ValueError(f"probs has {p.shape[-1]} columns but {v.shape[0]} values were given")
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        raise ValueError("values must not all be equal (the normalisation divides by max - min)")
    total = p.sum(axis=-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("every row of probs must have a positive sum")
    expected = (p / total) @ v
    return (expected - lo) / (hi - lo)


def _refuse_native_llava(path: str) -> None:
    """A LLaVA-NeXT native checkpoint (e.g. lmms-lab/llava-critic-7b) would fail deep inside transformers."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return
    if "LlavaQwenForCausalLM" in archs:
        raise ValueError(
            f"{path} is a LLaVA-NeXT native checkpoint (LlavaQwenForCausalLM), which transformers cannot load; "
            f"convert it once with `richpref models convert-llava-critic {path} <new dir>` and use the new dir")


def option_token_ids(tokenizer: Any, options: Sequence[Option]) -> list[list[int]]:
    """Token ids read for each option: the ids of its spellings that are one token each.

    A spelling of several tokens would be read by its first token, a prefix shared with other
    words, so it is used only when no spelling of that option is a single token. Options must
    not share a token, else they cannot be told apart.
    """
    if not options:
        raise ValueError("options must not be empty")
    groups: list[list[int]] = []
    for opt in options:
        spellings = [opt] if isinstance(opt, str) else list(opt)
        encoded = [tokenizer.encode(sp, add_special_tokens=False) for sp in spellings]
        if not spellings or any(not e for e in encoded):
            raise ValueError(f"option {opt!r} has a spelling that encodes to no tokens")
        single = [e[0] for e in encoded if len(e) == 1]
        ids = single or [encoded[0][0]]
        groups.append(sorted({int(i) for i in ids}))
    flat = [i for g in groups for i in g]
    if len(set(flat)) != len(flat):
        raise ValueError(f"options {list(options)} share a token ({groups}); they cannot be told apart")
    return groups


def chat_text(processor: Any, prompt: str) -> str:
    """One user turn [image, prompt] in the model's chat template, ready for the answer."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class VisionLanguageModel:
    """A loaded VLM plus its processor. Build with `VisionLanguageModel.load(path)`."""

    def __init__(self, model: Any, processor: Any, model_id: str, device: torch.device, image_caps: Any = None) -> None:
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.device = device
        self.image_caps = image_caps  # schemas.serving.ImageCaps: pixel bounds applied before encoding

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        image_caps: Any = None,
    ) -> "VisionLanguageModel":
        """Load processor and model from a local directory or (cached) Hub id, in eval mode."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        _refuse_native_llava(path)
        dev = resolve_device(device)
        if dtype == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported():
            # Qwen2-family VLMs overflow in float16 (NaN logits, "!!!!" outputs); bfloat16 is what
            # they were trained in, so prefer it over the project-wide float16 GPU default.
            torch_dtype = torch.bfloat16
        else:
            torch_dtype = resolve_dtype(dtype, dev)

        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        # device_map puts the weights straight on the device (no full CPU copy of a 7B model first).
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch_dtype, device_map=str(dev), trust_remote_code=trust_remote_code
        )
        model.eval()
        if getattr(image_caps, "max_tiles", None):
            from .vlm_grid import cap_loaded

            cap_loaded(model, processor, image_caps.max_tiles)

        tok = processor.tokenizer
        # Left padding: generation appends after the last column, and the answer position of
        # every row is then the last input position.
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        gen = model.generation_config
        if gen.pad_token_id is None:
            gen.pad_token_id = tok.pad_token_id
        if gen.eos_token_id is None:
            gen.eos_token_id = tok.eos_token_id

        if getattr(processor, "chat_template", None) is None:
            if model.config.model_type == "llava_onevision":
                # Some community LLaVA-Critic conversions ship no template; LLaVA-OneVision-Qwen2
                # was trained on ChatML, which is what the tiny template renders.
                from .tiny.vlm import LLAVA_CHAT_TEMPLATE

                log.warning("%s has no chat template; using ChatML with <image>", path)
                processor.chat_template = LLAVA_CHAT_TEMPLATE
            else:
                raise ValueError(f"{path}: the processor has no chat template")
        return cls(model, processor, str(path), dev, image_caps)

    def close(self) -> None:
        """Drop the model and processor and free their memory."""
        self.model = None
        self.processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "VisionLanguageModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ inputs

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def _check_loaded(self) -> None:
        if self.model is None:
            raise RuntimeError(f"{self.model_id} was closed")

    def _encode(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Chat-formatted, left-padded model inputs for one batch of (image, prompt) items."""
        texts = [chat_text(self.processor, prompt) for prompt in prompts]
        rgb = [im.convert("RGB") for im in images]
        if self.image_caps is not None:
            rgb = [self.image_caps.apply(im) for im in rgb]
        inputs = self.processor(images=rgb, text=texts, padding=True, return_tensors="pt")
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _uses_mrope(self) -> bool:
        """Qwen-VL models compute their own 3-D (M-RoPE) positions from the attention mask."""
        inner = getattr(self.model, "model", None)
        return hasattr(self.model, "get_rope_index") or hasattr(inner, "get_rope_index")

    @staticmethod
    def _batches(n: int, batch_size: int):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        for start in range(0, n, batch_size):
            yield slice(start, min(start + batch_size, n))

    @staticmethod
    def _check_lengths(images: Sequence[Any], prompts: Sequence[str]) -> None:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        images: list[Image.Image],
        prompts: list[str],
        *,
        max_new_tokens: int = 128,
        batch_size: int = 8,
    ) -> list[str]:
        """Greedy answer to each (image, prompt); returns only the new text, special tokens removed."""
        return [g.text for g in self.generate_detailed(images, prompts, max_new_tokens=max_new_tokens,
                                                        batch_size=batch_size)]

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return {int(i) for i in ids}

    def generate_detailed(
        self,
        images: list[Image.Image],
        prompts: list[str],
        *,
        max_new_tokens: int = 128,
        batch_size: int = 8,
    ) -> list[Generation]:
        """Greedy answers with their end state: `finished` is False when `max_new_tokens` cut the answer.

        Sampling settings from the checkpoint's generation config are switched off; other logits
        processors it declares (e.g. Qwen's repetition_penalty) stay, as the model authors intended.
        """
        self._check_loaded()
        self._check_lengths(images, prompts)
        eos_ids = self._eos_ids()
        out: list[Generation] = []
        with torch.inference_mode():
            for sl in self._batches(len(prompts), batch_size):
                inputs = self._encode(images[sl], prompts[sl])
                generated = self.model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
                # Left padding: every row's prompt ends at the same column.
                new_tokens = generated[:, inputs["input_ids"].shape[1] :].tolist()
                for row in new_tokens:
                    end = next((k for k, t in enumerate(row) if t in eos_ids), None)
                    kept = row if end is None else row[:end]
                    text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
                    out.append(Generation(text=text, finished=end is not None, new_tokens=len(kept)))
        return out

    # ------------------------------------------------------------------ scoring

    def _option_token_ids(self, options: Sequence[Option]) -> list[list[int]]:
        return option_token_ids(self.tokenizer, options)

    def _next_token_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at the answer position (the last column, thanks to left padding), float32."""
        kwargs = dict(inputs)
        if not self._uses_mrope():
            # Same positions as `generate` computes for left-padded rows (pads do not count).
            mask = inputs["attention_mask"].long()
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        # logits_to_keep=1: only the last position, no (batch, seq, vocab) tensor for 150k vocabs.
        out = self.model(**kwargs, logits_to_keep=1, use_cache=False)
        return out.logits[:, -1, :].float()

    def option_probabilities(
        self,
        images: list[Image.Image],
        prompts: list[str],
        options: Sequence[Option],
        *,
        batch_size: int = 8,
    ) -> np.ndarray:
        """P(option | image, prompt) for each item, shape (n, len(options)), rows sum to 1.

        One forward pass per batch: softmax over the full vocabulary at the first answer position,
        each option's probability is the sum over its spellings' tokens (see `_option_token_ids`),
        then the options are renormalised among themselves.
        """
        self._check_loaded()
        self._check_lengths(images, prompts)
        groups = self._option_token_ids(options)
        flat = torch.tensor([i for g in groups for i in g], device=self.device)
        # Column k of `member` is 1 for the token ids of option k: probs @ member sums each group.
        member = torch.zeros(len(flat), len(groups), dtype=torch.float64, device=self.device)
        row = 0
        for k, g in enumerate(groups):
            member[row : row + len(g), k] = 1.0
            row += len(g)
        rows = []
        with torch.inference_mode():
            for sl in self._batches(len(prompts), batch_size):
                logits = self._next_token_logits(self._encode(images[sl], prompts[sl]))
                probs = torch.softmax(logits, dim=-1)[:, flat].double() @ member
                rows.append((probs / probs.sum(dim=-1, keepdim=True)).cpu().numpy())
        if not rows:
            return np.zeros((0, len(options)), dtype=np.float64)
        return np.concatenate(rows, axis=0)

    def yes_no(self, images: list[Image.Image], prompts: list[str], *, batch_size: int = 8) -> list[YesNo]:
        """`p_yes` as `YesNo` answers (source "logits"), the form the served backend also returns."""
        return [YesNo(float(p), "logits") for p in self.p_yes(images, prompts, batch_size=batch_size)]

    def p_yes(self, images: list[Image.Image], prompts: list[str], *, batch_size: int = 8) -> np.ndarray:
        """P(yes) / (P(yes) + P(no)) for yes/no questions, summed over the spellings in `YES_NO`."""
        probs = self.option_probabilities(images, prompts, YES_NO, batch_size=batch_size)
        return probs[:, 0] if probs.shape[0] else np.zeros(0, dtype=np.float64)

    def expected_score(
        self,
        images: list[Image.Image],
        prompts: list[str],
        *,
        scale: Sequence[int] = range(1, 10),
        batch_size: int = 8,
    ) -> np.ndarray:
        """PortraitRL §3.2 expected score in [0, 1], shape (n,).

        The prompt should ask for a rating on `scale` (single digits, so each score is one token);
        E = sum_m m p(m) over the scale's tokens at the answer position, then (E - min) / (max - min).
        """
        values = list(scale)
        bad = [m for m in values if not (isinstance(m, (int, np.integer)) and 0 <= m <= 9)]
        if bad:
            raise ValueError(f"scale values must be single digits 0-9, got {bad}")
        probs = self.option_probabilities(images, prompts, [str(m) for m in values], batch_size=batch_size)
        if probs.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        return expected_score_from_probs(probs, values)

    def __repr__(self) -> str:
        state = "closed" if self.model is None else f"{self.device}, {self.model.dtype}"
        return f"VisionLanguageModel({self.model_id!r}, {state})"


__all__ = ["Generation", "Option", "VisionLanguageModel", "YES_NO", "YesNo", "expected_score_from_probs",
           "option_token_ids"]
