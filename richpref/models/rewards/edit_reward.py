"""EditReward (TIGER-Lab, 2025): an edit-quality judge on Qwen2.5-VL-7B, scoring (original, instruction, edit).

Reference: github.com/TIGER-AI-Lab/EditReward, `EditReward/inference_vl_edit.py`
(`EditRewardVLInferencer.prepare_batch`, `reward`), `EditReward/model/qwen2_5_vl_trainer.py`
(`Qwen2_5_VLRewardModelBT_MultiHead`) and `EditReward/config/EditReward-Qwen2.5-7B-VL.yaml`
(`rm_head_type: ranknet_multi_head`, `pooling_strategy: mean`). The checkpoint dir holds
`model.safetensors` (a whole state dict); the base is `Qwen/Qwen2.5-VL-7B-Instruct` (`backbone:`).

Each pair is judged twice, once per head: head 0 on the instruction-following question (`template`,
default `edit_reward_following_v1`), head 1 on the visual-quality question (`quality_template`, default
`edit_reward_quality_v1`), each with the source image then the edited image in one user turn. The
default questions are in richpref's words; the checkpoint was trained with its authors' wording, which
a user may supply as text files (docs/judges.md); the score is the mean of the two heads' mu.

As a pair reward, `score_pairs` gives the edit's side that score and the original's side the score
of the original judged as its own edit (no change made), so an edit that is worse than doing nothing
ranks below its original.
"""
from __future__ import annotations

import numpy as np

from ...prompts import load_head_template, render
from ...schemas.relabel import JUDGE_FILES
from .base import batches
from .qwen_head import QwenHeadReward, fit_image

TEMPLATES = ("edit_reward_following_v1", "edit_reward_quality_v1")  # the defaults, one per head, in head order


class EditReward(QwenHeadReward):
    model_type = "qwen2_5_vl"
    head_prefixes = ("rm_heads.head_0", "rm_heads.head_1")
    pairwise = True

    def __init__(self, path: str, *, backbone: str | None = None, file: str | None = None, device: str = "auto",
                 dtype: str = "auto", template: str = TEMPLATES[0], quality_template: str = TEMPLATES[1]) -> None:
        self.templates = [load_head_template(t) for t in (template, quality_template)]  # head order
        super().__init__(path, backbone=backbone or "Qwen/Qwen2.5-VL-7B-Instruct", file=file or JUDGE_FILES["edit_reward"],
                         device=device, dtype=dtype)

    def score_edits(self, originals, edits, instructions, *, batch_size: int = 8) -> np.ndarray:
        """One score per (original, instruction, edit)."""
        if not len(originals) == len(instructions) == len(edits):
            raise ValueError(f"{len(originals)} originals, {len(instructions)} instructions, {len(edits)} edits: "
                             "give one of each per pair")
        out = np.empty(len(edits), dtype=np.float64)
        for sl in batches(len(edits), batch_size):
            images = [im for a, b in zip(originals[sl], edits[sl]) for im in (fit_image(a), fit_image(b))]
            mus = [self.run([self.render([None, None], render(t, prompt=p)) for p in instructions[sl]], images, head=h)[:, 0]
                   for h, t in enumerate(self.templates)]
            out[sl] = ((mus[0] + mus[1]) / 2).double().cpu().numpy()
        return out

    def score_pairs(self, originals, edits, prompts, *, batch_size: int = 8) -> np.ndarray:
        """(n, 2): the original judged as an unchanged edit of itself, and the edit; `prompts` are the instructions."""
        if len(originals) != len(edits):
            raise ValueError(f"{len(originals)} originals but {len(edits)} edits")
        return np.stack([self.score_edits(originals, originals, prompts, batch_size=batch_size),
                         self.score_edits(originals, edits, prompts, batch_size=batch_size)], axis=1)



def load(path: str, *, backbone: str | None = None, file: str | None = None, template: str = TEMPLATES[0],
         quality_template: str = TEMPLATES[1], engine=None, device: str = "auto",
         dtype: str = "auto"):
    """The reward's loader: in this process, or through richpref's judge server when `engine.backend` is
    `server` (the same code then runs in the server: models/judge_server.py)."""
    options = dict(backbone=backbone, file=file, template=template, quality_template=quality_template, device=device, dtype=dtype)
    if engine is not None and engine.backend == "server":
        from .served_head import SERVED

        return SERVED["edit_reward"](path, engine=engine, **options)
    return EditReward(path, **options)
