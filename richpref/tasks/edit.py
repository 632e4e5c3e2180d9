"""edit: original + prompt + instructions -> edited image, by the editor `edit.kind` names (models/editor.py).

Each edit is made and stored at the editor's working size (`edit.resolution`, native by default);
export brings the original to that size (richpref/tasks/pair_images.py)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from richpref.common.images import BadImage, decode_image, encode_png, pixel_change
from richpref.common.overlap import Memo, chunks, pipelined
from ..schemas.config import EditConfig, Profile
from ..schemas.tables import EDITS, rows_to_table
from .base import ModelUse, Stage, StageInputs, item_seed, kept, rejected
from .edit_prompts import edit_prompt, fit_prompt  # noqa: F401 - edit_prompt re-exported


def load_editor(cfg: EditConfig, models_root: str | None):
    from ..models.editor import load_editor as load

    return load(cfg, models_root)


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


def candidate_seed(base: int, item_id: str, candidate: int) -> int:
    """Candidate 0 keeps the item's seed (a one-edit run reproduces it); the others get their own."""
    return item_seed(base, item_id if candidate == 0 else f"{item_id}#edit{candidate}")


def edit_row(iid: str, c: int, original, fitted, seed: int, img, model_id: str, cfg: EditConfig) -> dict:
    change = pixel_change(original, img)
    common = dict(candidate=c, edit_prompt=fitted.text, seed=seed, control=cfg.control, pixel_change=change,
                  model_id=model_id, width=img.width, height=img.height, editor=cfg.kind,
                  edit_instructions=fitted.used, dropped_instructions=fitted.dropped, prompt_note=fitted.note)
    reason = guard_reason(original, img, cfg.min_pixel_change)
    return rejected(iid, reason, **common) if reason else kept(iid, image=encode_png(img), **common)


def edit_batches(todo: list, editor, batch_size: int, settings: dict) -> list:
    """The batches `editor.edit` forms for a whole shard: items grouped by the editor's working size
    in order of first appearance, each group cut into `batch_size` chunks. Calling it batch by batch
    with these keeps every batch's composition, hence its outputs."""
    groups: dict = {}
    for t in todo:
        groups.setdefault(editor.working_size(t[2].size, **settings), []).append(t)
    return [batch for group in groups.values() for batch in chunks(group, batch_size)]


def edit_rows(rows: pa.Table, originals: list, cfg: EditConfig, get_editor) -> pa.Table:
    """`cfg.num_edits` rows per input row, candidates 0 .. num_edits-1, in input order. The edit
    prompt keeps the instructions the editor's text encoders read whole (`fit_prompt`)."""
    out, ready, todo = {}, [], []
    candidates = range(cfg.num_edits)
    for r, data in zip(rows.to_pylist(), originals):
        iid = r["item_id"]
        text = edit_prompt(r["prompt"], r["instructions"] or [], cfg)
        if not any(s and s.strip() for s in r["instructions"] or []):
            for c in candidates:
                out[iid, c] = rejected(iid, "no_instructions: nothing to edit with", candidate=c, edit_prompt=text)
            continue
        try:
            ready.append((iid, r, decode_image(data)))
        except BadImage as exc:
            for c in candidates:
                out[iid, c] = rejected(iid, str(exc), candidate=c, edit_prompt=text)
    editor = get_editor() if ready else None
    for iid, r, original in ready:
        fitted = fit_prompt(r["prompt"], r["instructions"] or [], cfg, editor.count_tokens)
        if fitted.reject:
            for c in candidates:
                out[iid, c] = rejected(iid, fitted.reject, candidate=c, edit_prompt=fitted.text,
                                       dropped_instructions=fitted.dropped)
            continue
        todo += [(iid, c, original, fitted, candidate_seed(cfg.seed, iid, c)) for c in candidates]
    if todo:
        from ..models.editor import editor_settings

        settings = editor_settings(cfg)  # the settings of cfg.kind
        # A ControlNet editor's detector (cfg.control's, see load_editor) makes each control image; they are
        # computed for the next batch on the pool while the model edits this one.
        detector = getattr(editor, "detector", None)
        control = Memo(detector) if callable(detector) else None

        def prepare(batch):
            if control is not None:
                control.fill([t[2] for t in batch])
            return batch

        def run(batch):
            return editor.edit([t[2] for t in batch], [t[3].text for t in batch], [t[4] for t in batch],
                               batch_size=len(batch), output_size="working", **settings)

        def finish(batch, _, edited):  # guards and PNG encoding overlap the next batch's edit
            if control is not None:
                control.drop([t[2] for t in batch])
            return {(iid, c): edit_row(iid, c, original, fitted, seed, img, editor.model_id, cfg)
                    for (iid, c, original, fitted, seed), img in zip(batch, edited)}

        if control is not None:
            editor.detector = control
        try:
            for done in pipelined(edit_batches(todo, editor, cfg.batch_size, settings), run, prepare=prepare, finish=finish):
                out.update(done)
        finally:
            if control is not None:
                editor.detector = detector
    return rows_to_table([out[i, c] for i in rows.column("item_id").to_pylist() for c in candidates], EDITS)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.edit
    rows = inputs.rows.select(["item_id", "prompt", "instructions"])
    originals = inputs.lookup("sample", ["image"]).column("image").to_pylist()
    return edit_rows(rows, originals, cfg, lambda: load_editor(cfg, profile.models_root))


def models(profile: Profile) -> list[ModelUse]:
    e = profile.edit
    return [ModelUse("edit.model", e.model, "diffusers", e), ModelUse("edit.controlnet", e.controlnet, "diffusers", e),
            ModelUse("edit.control_weights", e.control_weights, "annotator", e)]


STAGE = Stage(name="edit", version="6", section="edit", reads=("instruct", "sample"), compute=compute,
              fan_out=lambda profile: profile.edit.num_edits, schema=EDITS, models=models,
              load=lambda profile: [load_editor(profile.edit, profile.models_root).model_id])
