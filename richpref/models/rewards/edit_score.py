"""EditScore (VectorSpaceLab/EditScore, `editscore` on PyPI: a LoRA on Qwen2.5-VL-7B-Instruct) as an
edit judge: it scores an edit from (original, instruction, edited), VIEScore-style.

Two questions per edit, each one user turn whose images are labelled as the reference labels them
(`<img1>: <image><img2>: <image>question`):
- semantics (SC): original and edited image, the instruction; answers two scores on 0..`scale`
  (instruction followed; no over-editing);
- quality (PQ): the edited image alone; two scores (naturalness; no artifacts).
SC = min(SC scores), PQ = min(PQ scores), each divided by scale / 10; the score is
overall = sqrt(SC * PQ) on 0..10 (`judge_parse.edit_score`). The reference asks on a 0..25 scale
(`score_range=25`); the questions are `richpref/prompts/edit_score_v1.txt` in this project's words.

Differences from the reference, on purpose: answers are greedy (the reference samples at
temperature 0.7, top_p 0.9, top_k 20 and may average `num_pass` samples), so a served and an
in-process judge agree; an answer with no usable score is NaN with its raw text in `unparsed`,
never the middle of the scale. Images get the reference's qwen_vl_utils resize.

In relabel an original is scored as the edit that changes nothing (original, instruction,
original): that is what the edit competes with.
"""
from __future__ import annotations

import math

import numpy as np

from ...prompts import load_sections, render
from .judge_chat import ask, load_judge_vlm, qwen_resize
from .judge_parse import edit_score


class EditScore:
    edit_judge = True  # scores (original, instruction, edited), not an image on its own

    def __init__(self, path: str, *, adapter: str | None = None, template: str = "edit_score_v1", scale: int = 25,
                 engine=None, max_new_tokens: int = 512, device: str = "auto", dtype: str = "auto") -> None:
        sections = load_sections(template)
        missing = {"edit", "quality"} - set(sections)
        if missing:
            raise ValueError(f"template {template!r} lacks section(s) {sorted(missing)}: an edit_score template "
                             "has an [edit] and a [quality] question")
        self.template_name, self.scale, self.max_new_tokens = template, scale, max_new_tokens
        self.edit_q = render(sections["edit"], scale=scale, instruction="{instruction}")
        self.quality_q = render(sections["quality"], scale=scale)
        self.vlm = load_judge_vlm(path, engine=engine, adapter=adapter, device=device, dtype=dtype, images=2)
        self.model_id = self.vlm.model_id if adapter is None else f"{path}+{adapter}"
        self.unparsed: dict[int, str] = {}
        self.details: list[dict] = []  # per edit of the last call: semantics, quality, overall

    def questions(self, original, edited, instruction: str) -> tuple[list, list]:
        o, e = qwen_resize(original), qwen_resize(edited)
        semantics = ["<img1>: ", o, "<img2>: ", e, self.edit_q.replace("{instruction}", instruction)]
        return semantics, ["<img1>: ", e, self.quality_q]

    def score_edits(self, originals, edits, instructions, *, batch_size: int = 8) -> np.ndarray:
        """overall per (original, edited, instruction); NaN where an answer gave no usable score."""
        if not (len(originals) == len(edits) == len(instructions)):
            raise ValueError(f"{len(originals)} originals, {len(edits)} edits and {len(instructions)} instructions: "
                             "give one of each per edit")
        qs = [self.questions(o, e, i) for o, e, i in zip(originals, edits, instructions)]
        gens = ask(self.vlm, [q[0] for q in qs] + [q[1] for q in qs], max_new_tokens=self.max_new_tokens,
                   batch_size=batch_size)
        n = len(qs)
        out = np.full(n, math.nan)
        self.unparsed, self.details = {}, []
        for k in range(n):
            sc, pq = gens[k], gens[n + k]
            d = edit_score(None if sc.error else sc.text, None if pq.error else pq.text, self.scale)
            self.details.append(d)
            if math.isnan(d["overall"]):
                self.unparsed[k] = " | ".join(g.error or g.text for g in (sc, pq))
            else:
                out[k] = d["overall"]
        return out

    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        raise TypeError("edit_score judges an edit against its original and instruction: call "
                        "score_edits(originals, edits, instructions)")

    def close(self) -> None:
        self.vlm.close()
