"""HPSv3 (MizzenAI, ICCV 2025): a Qwen2-VL-7B preference model with an uncertainty-aware head.

Reference: `hpsv3` 1.0.0 on PyPI, `hpsv3/inference.py` (`HPSv3RewardInferencer.prepare_batch`, `reward`)
and `hpsv3/model/qwen2vl_trainer.py` (`Qwen2VLRewardModelBT.forward`). Weights: `MizzenAI/HPSv3`,
file `HPSv3.safetensors` (a whole state dict), on the base `Qwen/Qwen2-VL-7B-Instruct` (config,
tokenizer, processor: the reward's `backbone:`). One image per conversation, the prompt inside an instruction
text ending in `<|Reward|>`: `template` (default `hpsv3_v1`, in richpref's words; the checkpoint was
trained with its authors' wording, which a user may supply as a text file, docs/judges.md); the score is the
head's mu (the reference prints `rewards[i][0]`). See `qwen_head.py` for what is shared with EditReward.
"""
from __future__ import annotations

import numpy as np

from ...prompts import load_head_template, render
from ...schemas.relabel import JUDGE_FILES
from .base import batches, check_lengths
from .qwen_head import QwenHeadReward, fit_image

TEMPLATE = "hpsv3_v1"


class HPSv3(QwenHeadReward):
    model_type = "qwen2_vl"
    head_prefixes = ("rm_head",)

    def __init__(self, path: str, *, backbone: str | None = None, file: str | None = None, device: str = "auto",
                 dtype: str = "auto", template: str = TEMPLATE) -> None:
        self.template = load_head_template(template)  # before the weights load: a bad template fails at once
        super().__init__(path, backbone=backbone or "Qwen/Qwen2-VL-7B-Instruct", file=file or JUDGE_FILES["hpsv3"],
                         device=device, dtype=dtype)

    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        check_lengths(images, prompts)
        out = np.empty(len(images), dtype=np.float64)
        for sl in batches(len(images), batch_size):
            texts = [self.render([None], render(self.template, prompt=p)) for p in prompts[sl]]
            mu_sigma = self.run(texts, [fit_image(im) for im in images[sl]], head=0)
            out[sl] = mu_sigma[:, 0].double().cpu().numpy()
        return out



def load(path: str, *, backbone: str | None = None, file: str | None = None, template: str = TEMPLATE, engine=None, device: str = "auto",
         dtype: str = "auto"):
    """The reward's loader: in this process, or through richpref's judge server when `engine.backend` is
    `server` (the same code then runs in the server: models/judge_server.py)."""
    options = dict(backbone=backbone, file=file, template=template, device=device, dtype=dtype)
    if engine is not None and engine.backend == "server":
        from .served_head import SERVED

        return SERVED["hpsv3"](path, engine=engine, **options)
    return HPSv3(path, **options)
