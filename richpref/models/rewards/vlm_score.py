"""VLM expected score (PortraitRL §3.2) as a reward: the probability-weighted rating over the digit
tokens 1–9 at the answer position, normalised to [0, 1] (`VisionLanguageModel.expected_score`).

The question is a versioned template (`richpref/prompts/<template>.txt`) with a `{prompt}` field; its
text is part of the relabel stage's cache key. With `engine: {backend: server, ...}` the rating comes
from an OpenAI-compatible server (`models/vlm_client.py`): the digit tokens' top logprobs where the
server returns them, else the answered digit (a one-hot rating).
"""
from __future__ import annotations

import numpy as np

from ...prompts import load_template, render
from .base import check_lengths

SCALE = range(1, 10)


class VLMExpectedScore:
    def __init__(self, path: str, *, template: str = "reward_score_v1", device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, engine=None) -> None:
        self.template_name = template
        self.template = load_template(template)
        from ..vlm_engine import load_vlm

        self.vlm = load_vlm(engine, path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model_id = self.vlm.model_id

    def questions(self, prompts) -> list[str]:
        return [render(self.template, prompt=p).strip() for p in prompts]

    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        check_lengths(images, prompts)
        return self.vlm.expected_score(list(images), self.questions(prompts), scale=SCALE, batch_size=batch_size)

    def close(self) -> None:
        self.vlm.close()
