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
    controlnet = resolve_model_ref(cfg.controlnet, models_root)
    # Annotator weights only matter to the network controls; the others ignore them.
    weights = resolve_model_ref(cfg.control_weights, models_root) if cfg.control_weights else None
    return resident.get(
        ("editor", base, controlnet, cfg.control, weights, cfg.device, cfg.dtype),
        lambda: ControlNetEditor.load(base, controlnet, device=cfg.device, dtype=cfg.dtype,
                                      control=cfg.control, control_weights=weights),
    )


def edit_prompt(prompt: str, instructions: list[str], cfg: EditConfig) -> str:
    """The edit's text prompt: the original prompt and the instructions joined with `edit.joiner`
    (RPO), or the instructions alone (`prompt_mode: instructions`, the paper's ablation)."""
    steps = [s for s in instructions if s and s.strip()]
    return cfg.joiner.join(steps if cfg.prompt_mode == "instructions" else [prompt, *steps])


def guard_reason(original, edited, min_pixel_change: float) -> str | None:
    """Why an edit is unusable (`code: detail`), or None when it is kept.

    A flat image (every channel's standard deviation over the pixels under one grey level) is a
    failed generation whatever the original; an edit whose mean |edited - original| / 255 is under
    `min_pixel_change` changed nothing the rest of the pipeline could judge.
    """
    pixels = np.asarray(edited.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    if float(pixels.std(axis=0).max()) < 1.0:
        return "blank_edit: the edited image is a flat colour"
    change = pixel_change(original, edited)
    if change < min_pixel_change:
        return f"no_visible_change: mean change {change:.4f} < edit.min_pixel_change={min_pixel_change}"
    return None


def edit_rows(rows: pa.Table, originals: list, cfg: EditConfig, get_editor) -> pa.Table:
    out, todo = {}, []
    for r, data in zip(rows.to_pylist(), originals):
        iid = r["item_id"]
        text = edit_prompt(r["prompt"], r["instructions"] or [], cfg)
        if not any(s and s.strip() for s in r["instructions"] or []):
            out[iid] = rejected(iid, "no_instructions: nothing to edit with", edit_prompt=text)
            continue
        try:
            todo.append((r, decode_image(data), text))
        except BadImage as exc:
            out[iid] = rejected(iid, str(exc), edit_prompt=text)
    if todo:
        editor = get_editor()
        seeds = [item_seed(cfg.seed, r["item_id"]) for r, _, _ in todo]
        # The editor was loaded with cfg.control's detector (see load_editor).
        edited = editor.edit([img for _, img, _ in todo], [t for _, _, t in todo], seeds,
                             strength=cfg.strength, guidance_scale=cfg.guidance_scale,
                             conditioning_scale=cfg.conditioning_scale, steps=cfg.steps, batch_size=cfg.batch_size)
        for (r, original, text), seed, img in zip(todo, seeds, edited):
            iid = r["item_id"]
            change = pixel_change(original, img)
            common = dict(edit_prompt=text, seed=seed, control=cfg.control, pixel_change=change,
                          model_id=editor.model_id, width=img.width, height=img.height)
            reason = guard_reason(original, img, cfg.min_pixel_change)
            if reason:
                out[iid] = rejected(iid, reason, **common)
            else:
                out[iid] = kept(iid, image=encode_png(img), **common)
    return rows_to_table([out[i] for i in rows.column("item_id").to_pylist()], EDITS)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.edit
    rows = inputs.rows.select(["item_id", "prompt", "instructions"])
    originals = inputs.lookup("sample", ["image"]).column("image").to_pylist()
    return edit_rows(rows, originals, cfg, lambda: load_editor(cfg, profile.models_root))


STAGE = Stage(name="edit", version="2", section="edit", reads=("instruct", "sample"), compute=compute)
