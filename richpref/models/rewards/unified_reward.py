"""UnifiedReward (CodeGoat24/UnifiedReward; LLaVA-OneVision or Qwen2.5-VL checkpoints) as a pointwise
image reward: the judge is asked about one (image, caption), reasons in text and ends with
`Final Score: X` (1..5); the score is X.

Reference: the repo's `qwen_point_score_image_generation.py` (one user turn: the image, then the
question; greedy `generate`, max_new_tokens 512) and flow_grpo's `unifiedreward_score_sglang` (the
same question, `Final Score:\\s*([1-5](?:\\.\\d+)?)`). The question is `richpref/prompts/<template>.txt`
in this project's words (`unified_reward_v1`), with a `{prompt}` field. Qwen2.5-VL checkpoints get the
reference's qwen_vl_utils resize (sides to multiples of 28) before either backend sees the image.

An answer with no `Final Score:` is NaN, never a made-up score (flow_grpo scores it 0): `unparsed`
keeps the raw answer by position for the caller to report.
"""
from __future__ import annotations

import math

import numpy as np

from ...prompts import load_template, render
from .base import check_lengths
from .judge_chat import ask, load_judge_vlm, model_type, qwen_resize
from .judge_parse import final_score


class UnifiedReward:
    def __init__(self, path: str, *, template: str = "unified_reward_v1", engine=None, max_new_tokens: int = 512,
                 device: str = "auto", dtype: str = "auto") -> None:
        self.template_name = template
        self.template = load_template(template)
        self.max_new_tokens = max_new_tokens
        self.qwen = model_type(path).startswith("qwen2")
        self.vlm = load_judge_vlm(path, engine=engine, device=device, dtype=dtype)
        self.model_id = self.vlm.model_id
        self.unparsed: dict[int, str] = {}  # position -> raw answer, of the last call

    def question(self, image, prompt: str) -> list:
        return [qwen_resize(image) if self.qwen else image.convert("RGB"), render(self.template, prompt=prompt).strip()]

    def answers(self, images, prompts, *, batch_size: int = 8):
        check_lengths(images, prompts)
        return ask(self.vlm, [self.question(im, p) for im, p in zip(images, prompts)],
                   max_new_tokens=self.max_new_tokens, batch_size=batch_size)

    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        gens = self.answers(images, prompts, batch_size=batch_size)
        out = np.full(len(gens), math.nan)
        self.unparsed = {}
        for k, g in enumerate(gens):
            value = None if g.error else final_score(g.text)
            if value is None:
                self.unparsed[k] = g.error or g.text
            else:
                out[k] = value
        return out

    def close(self) -> None:
        self.vlm.close()
