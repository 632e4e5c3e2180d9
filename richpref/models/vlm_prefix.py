"""In-process prefix sharing: several yes/no questions about one image, the image encoded once.

Every question is one user turn [image, question]; rendered with the chat template, the questions
about one image share their first tokens (system turn, image tokens, …). The shared prefix runs once
with the pixels (one vision-encoder pass), its key/value cache is kept, and the questions' remaining
tokens run on top of it, `batch_size` questions a forward pass (the cache repeated over the batch, the
shorter questions padded at their end, each read at its own last token), the cache cut back to the
prefix before the next batch. The probabilities are those of the full prompts up to float noise
(`tests/models/test_vlm_prefix.py` checks them against `VisionLanguageModel.p_yes`). Used by the check
stage, whose pairs ask 10-17 questions about four images.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from .vlm import YES_NO, VisionLanguageModel, chat_text

# Counters a benchmark reads: vision-encoder passes and forward passes.
STATS = {"image_encodings": 0, "forward_passes": 0}


def _common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    k = 0
    while k < n and all(r[k] == rows[0][k] for r in rows):
        k += 1
    return k


def question_rows(vlm: VisionLanguageModel, first: list[int], prompts: list[str],
                  image_token: int | None) -> list[list[int]] | None:
    """Each prompt's token ids with the image's tokens, `first` being the first prompt's as the processor
    made them, without processing the image again: a prompt's chat text tokenized alone holds the image
    as one placeholder token, where the first prompt's run of image tokens goes. None where that does
    not give back `first` exactly (then the processor makes each row)."""
    def spliced(prompt: str, run: list[int]) -> list[int] | None:
        ids = vlm.tokenizer(chat_text(vlm.processor, prompt))["input_ids"]
        at = [k for k, t in enumerate(ids) if t == image_token]
        return ids[:at[0]] + run + ids[at[0] + 1:] if len(at) == 1 else None

    start = first.index(image_token) if image_token in first else -1
    end = start + next((k for k, t in enumerate(first[start:]) if t != image_token), 0)
    if start < 0 or end <= start or spliced(prompts[0], first[start:end]) != first:
        return None
    rows = [first] + [spliced(p, first[start:end]) for p in prompts[1:]]
    return rows if all(r is not None for r in rows) else None


def p_yes_sharing_image(vlm: VisionLanguageModel, image, prompts: list[str], batch_size: int) -> np.ndarray:
    """P(yes) per prompt about one `image` (same numbers as `vlm.p_yes`), the image encoded once and
    the prompts' own tokens run `batch_size` at a time."""
    vlm._check_loaded()
    if len(prompts) < 2:
        STATS["image_encodings"] += len(prompts)
        STATS["forward_passes"] += len(prompts)
        return vlm.p_yes([image] * len(prompts), prompts, batch_size=1)
    enc = vlm._encode([image], [prompts[0]])  # pixels and the first prompt's tokens
    image_token = getattr(vlm.model.config, "image_token_id", None) or getattr(vlm.model.config, "image_token_index", None)
    first = enc["input_ids"][0].tolist()
    rows = question_rows(vlm, first, prompts, image_token) or (
        [first] + [vlm._encode([image], [p])["input_ids"][0].tolist() for p in prompts[1:]])
    last_image = max((k for k, t in enumerate(rows[0]) if t == image_token), default=-1)
    length = min(_common_prefix(rows), min(len(r) for r in rows) - 1)
    if length <= last_image:  # the questions do not share the image's tokens: ask them one by one
        STATS["image_encodings"] += len(prompts)
        STATS["forward_passes"] += len(prompts)
        return vlm.p_yes([image] * len(prompts), prompts, batch_size=1)

    groups = vlm._option_token_ids(YES_NO)
    fwd = vlm.model.forward
    cache_arg = "cache" if "cache" in inspect.signature(fwd).parameters else "past_key_values"
    prefix = {k: (v[:, :length] if k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
                  and isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in enc.items()}
    out = []
    with torch.inference_mode():
        first = vlm.model(**prefix, use_cache=True, logits_to_keep=1)
        cache = first.past_key_values
        STATS["image_encodings"] += 1
        STATS["forward_passes"] += 1
        held = 1  # the cache's batch size
        for start in range(0, len(rows), max(1, batch_size)):
            suffixes = [row[length:] for row in rows[start:start + max(1, batch_size)]]
            extra = cache.get_seq_length() - length
            if extra > 0:
                cache.crop(-extra)  # back to the shared prefix
            if held != len(suffixes):
                if held > 1:
                    cache.batch_select_indices(torch.tensor([0], device=vlm.device))  # every row holds the prefix
                if len(suffixes) > 1:
                    cache.batch_repeat_interleave(len(suffixes))
                held = len(suffixes)
            # Padding after a question's last token leaves its logits alone (causal attention), so no mask:
            # with one, Qwen2.5-VL would count the suffix's positions from 0, not from the prefix's end.
            width = max(len(s) for s in suffixes)
            ids = torch.tensor([s + s[-1:] * (width - len(s)) for s in suffixes], device=vlm.device)
            ends = sorted({len(s) - 1 for s in suffixes})
            logits = vlm.model(input_ids=ids, use_cache=True, logits_to_keep=torch.tensor(ends, device=vlm.device),
                               **{cache_arg: cache}).logits
            STATS["forward_passes"] += 1
            for k, s in enumerate(suffixes):
                probs = torch.softmax(logits[k, ends.index(len(s) - 1)].float(), dim=-1).double()
                yes, no = (float(probs[g].sum()) for g in groups)
                out.append(yes / (yes + no))
    return np.asarray(out, dtype=np.float64)


__all__ = ["STATS", "p_yes_sharing_image"]
