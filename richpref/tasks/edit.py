"""edit: original + prompt + instructions -> edited image (ControlNet img2img, control from the original)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..images import BadImage, decode_image, encode_png, pixel_change
from ..models.runtime import resident, resolve_model_ref
from ..overlap import Memo, chunks, pipelined
from ..schemas.config import EditConfig, Profile
from ..schemas.tables import EDITS, rows_to_table
from .base import Stage, StageInputs, item_seed, kept, rejected


def load_editor(cfg: EditConfig, models_root: str | None):
    from ..models.editor import ControlNetEditor

    base = resolve_model_ref(cfg.model, models_root)
    controlnet = resolve_model_ref(cfg.controlnet, models_root)
    # Annotator weights only matter to the network controls; the others ignore them.
    weights = resolve_model_ref(cfg.control_weights, models_root) if cfg.control_weights else None
    settings = dict(scheduler=cfg.scheduler, compile=cfg.compile, channels_last=cfg.channels_last)

    def load():
        from ..models.generator import apply_pipeline_settings

        editor = ControlNetEditor.load(base, controlnet, device=cfg.device, dtype=cfg.dtype, control=cfg.control,
                                       control_weights=weights)
        apply_pipeline_settings(editor.pipe, **settings)
        return editor

    key = ("editor", base, controlnet, cfg.control, weights, cfg.device, cfg.dtype)
    return resident.get(key + (tuple(settings.values()) if any(settings.values()) else ()), load)


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


def candidate_seed(base: int, item_id: str, candidate: int) -> int:
    """Candidate 0 keeps the item's seed (a one-edit run reproduces it); the others get their own."""
    return item_seed(base, item_id if candidate == 0 else f"{item_id}#edit{candidate}")


def edit_row(iid: str, c: int, original, text: str, seed: int, img, model_id: str, cfg: EditConfig) -> dict:
    change = pixel_change(original, img)
    common = dict(candidate=c, edit_prompt=text, seed=seed, control=cfg.control, pixel_change=change,
                  model_id=model_id, width=img.width, height=img.height)
    reason = guard_reason(original, img, cfg.min_pixel_change)
    return rejected(iid, reason, **common) if reason else kept(iid, image=encode_png(img), **common)


def edit_batches(todo: list, editor, batch_size: int) -> list:
    """The batches `editor.edit` forms for a whole shard: items grouped by working size (the image
    snapped to the VAE factor) in order of first appearance, each group cut into `batch_size` chunks.
    Calling it batch by batch with these keeps every batch's composition, hence its outputs."""
    try:
        from ..models.editor import _snap
    except ImportError:  # an editor without size snapping: group by the image's own size
        def _snap(size, multiple):
            return size
    factor = int(getattr(getattr(editor, "pipe", None), "vae_scale_factor", 8))
    groups: dict = {}
    for t in todo:
        groups.setdefault(_snap(t[2].size, factor), []).append(t)
    return [batch for group in groups.values() for batch in chunks(group, batch_size)]


def edit_rows(rows: pa.Table, originals: list, cfg: EditConfig, get_editor) -> pa.Table:
    """`cfg.num_edits` rows per input row, candidates 0 .. num_edits-1, in input order."""
    out, todo = {}, []
    candidates = range(cfg.num_edits)
    for r, data in zip(rows.to_pylist(), originals):
        iid = r["item_id"]
        text = edit_prompt(r["prompt"], r["instructions"] or [], cfg)
        if not any(s and s.strip() for s in r["instructions"] or []):
            for c in candidates:
                out[iid, c] = rejected(iid, "no_instructions: nothing to edit with", candidate=c, edit_prompt=text)
            continue
        try:
            original = decode_image(data)
        except BadImage as exc:
            for c in candidates:
                out[iid, c] = rejected(iid, str(exc), candidate=c, edit_prompt=text)
            continue
        todo += [(iid, c, original, text, candidate_seed(cfg.seed, iid, c)) for c in candidates]
    if todo:
        editor = get_editor()
        # The editor's detector (cfg.control's, see load_editor) makes each control image; they are
        # computed for the next batch on the pool while the model edits this one.
        detector = getattr(editor, "detector", None)
        control = Memo(detector) if callable(detector) else None

        def prepare(batch):
            if control is not None:
                control.fill([t[2] for t in batch])
            return batch

        def run(batch):
            return editor.edit([t[2] for t in batch], [t[3] for t in batch], [t[4] for t in batch],
                               strength=cfg.strength, guidance_scale=cfg.guidance_scale,
                               conditioning_scale=cfg.conditioning_scale, steps=cfg.steps, batch_size=len(batch))

        def finish(batch, _, edited):  # guards and PNG encoding overlap the next batch's edit
            if control is not None:
                control.drop([t[2] for t in batch])
            return {(iid, c): edit_row(iid, c, original, text, seed, img, editor.model_id, cfg)
                    for (iid, c, original, text, seed), img in zip(batch, edited)}

        if control is not None:
            editor.detector = control
        try:
            for done in pipelined(edit_batches(todo, editor, cfg.batch_size), run, prepare=prepare, finish=finish):
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


STAGE = Stage(name="edit", version="3", section="edit", reads=("instruct", "sample"), compute=compute,
              fan_out=lambda profile: profile.edit.num_edits)
