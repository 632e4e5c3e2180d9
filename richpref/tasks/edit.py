"""edit: original + prompt + instructions -> edited image (ControlNet img2img, control from the original)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..images import BadImage, decode_image, encode_png, pixel_change
from ..models.runtime import resident, resolve_model_ref
from ..schemas.config import EditConfig, Profile
from ..schemas.tables import EDITS, rows_to_table
from .base import Stage, StageInputs, item_seed, kept, rejected


def load_editor(cfg: EditConfig, models_root: str | None):
    from ..models.editor import ControlNetEditor

    base = resolve_model_ref(cfg.model, models_root)
    control = resolve_model_ref(cfg.controlnet, models_root)
    return resident.get(("editor", base, control, cfg.device, cfg.dtype),
                        lambda: ControlNetEditor.load(base, control, device=cfg.device, dtype=cfg.dtype))


def edit_prompt(prompt: str, instructions: list[str], cfg: EditConfig) -> str:
    joined = cfg.joiner.join(instructions)
    return joined if cfg.prompt_mode == "instructions" else f"{prompt}{cfg.joiner}{joined}"


def edit_rows(rows: pa.Table, originals: list, cfg: EditConfig, get_editor) -> pa.Table:
    out, todo = {}, []
    for r, data in zip(rows.to_pylist(), originals):
        iid = r["item_id"]
        text = edit_prompt(r["prompt"], r["instructions"], cfg)
        try:
            todo.append((r, decode_image(data), text))
        except BadImage as exc:
            out[iid] = rejected(iid, str(exc), edit_prompt=text)
    if todo:
        editor = get_editor()
        seeds = [item_seed(cfg.seed, r["item_id"]) for r, _, _ in todo]
        edited = editor.edit([img for _, img, _ in todo], [t for _, _, t in todo], seeds, control=cfg.control,
                             strength=cfg.strength, guidance_scale=cfg.guidance_scale,
                             conditioning_scale=cfg.conditioning_scale, steps=cfg.steps, batch_size=cfg.batch_size)
        for (r, original, text), seed, img in zip(todo, seeds, edited):
            iid = r["item_id"]
            change = pixel_change(original, img)
            common = dict(edit_prompt=text, seed=seed, control=cfg.control, pixel_change=change,
                          model_id=editor.model_id, width=img.width, height=img.height)
            if float(np.asarray(img, dtype=np.float32).std()) < 1.0:
                out[iid] = rejected(iid, "blank_edit: the edited image is a flat colour", **common)
            elif change < cfg.min_pixel_change:
                out[iid] = rejected(iid, f"no_visible_change: mean change {change:.4f} < edit.min_pixel_change", **common)
            else:
                out[iid] = kept(iid, image=encode_png(img), **common)
    return rows_to_table([out[i] for i in rows.column("item_id").to_pylist()], EDITS)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.edit
    rows = inputs.rows.select(["item_id", "prompt", "instructions"])
    originals = inputs.lookup("sample", ["image"]).column("image").to_pylist()
    return edit_rows(rows, originals, cfg, lambda: load_editor(cfg, profile.models_root))


STAGE = Stage(name="edit", version="1", section="edit", reads=("instruct", "sample"), compute=compute)
