"""instruct: image + prompt + critique -> short executable edit instructions (Qwen2.5-VL)."""
from __future__ import annotations

import re

import pyarrow as pa

from ..images import BadImage, decode_image
from ..prompts import load_template, render, template_hash
from ..schemas.config import InstructConfig, Profile
from ..schemas.tables import INSTRUCTIONS, rows_to_table
from .base import Stage, StageInputs, kept, rejected
from .critique import load_vlm

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|step\s*\d+[:.)])\s*", re.I)


def parse_instructions(text: str, max_instructions: int, max_chars: int) -> tuple[list[str], str | None]:
    """Model text -> (instructions, None) or ([], reason). One instruction per non-empty line."""
    items = []
    for line in (text or "").splitlines():
        line = _BULLET.sub("", line).strip().strip('"').strip()
        if line:
            items.append(line)
    if not items:
        return [], "no_instructions: the model output has no instruction line"
    too_long = [s for s in items if len(s) > max_chars]
    if too_long:
        return [], f"overlong_instruction: {len(too_long[0])} characters, over instruct.max_instruction_chars={max_chars}"
    if len(items) > max_instructions:
        return [], f"too_many_instructions: {len(items)}, over instruct.max_instructions={max_instructions}"
    return items, None


def instruct_rows(rows: pa.Table, images: list, cfg: InstructConfig, get_vlm) -> pa.Table:
    template = load_template("instruct_onestep_v1" if cfg.one_step else cfg.template)
    out, todo = {}, []
    for r, data in zip(rows.to_pylist(), images):
        try:
            todo.append((r, decode_image(data)))
        except BadImage as exc:
            out[r["item_id"]] = rejected(r["item_id"], str(exc), prompt=r["prompt"])
    if todo:
        vlm = get_vlm()
        prompts = [render(template, prompt=r["prompt"], critique=r.get("critique") or "",
                          max_instructions=cfg.max_instructions) for r, _ in todo]
        texts = vlm.generate([img for _, img in todo], prompts, max_new_tokens=cfg.max_new_tokens,
                             batch_size=cfg.batch_size)
        for (r, _), text in zip(todo, texts):
            items, reason = parse_instructions(text, cfg.max_instructions, cfg.max_instruction_chars)
            common = dict(prompt=r["prompt"], raw=text, template=cfg.template, model_id=vlm.model_id)
            out[r["item_id"]] = (rejected(r["item_id"], reason, **common) if reason
                                 else kept(r["item_id"], instructions=items, **common))
    return rows_to_table([out[i] for i in rows.column("item_id").to_pylist()], INSTRUCTIONS)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.instruct
    images = inputs.lookup("sample", ["image"]).column("image").to_pylist()
    return instruct_rows(inputs.rows, images, cfg, lambda: load_vlm(cfg, profile.models_root))


STAGE = Stage(name="instruct", version="1", section="instruct", reads=("critique", "sample"), compute=compute,
              key_extra=lambda p: template_hash("instruct_onestep_v1" if p.instruct.one_step else p.instruct.template))
