"""cutout: original and edited image -> foreground on white (rembg), for the filter and consistency rewards."""
from __future__ import annotations

import os

import pyarrow as pa

from richpref.common.images import BadImage, decode_image, encode_png
from ..models.runtime import resident
from richpref.common.overlap import chunks, pipelined
from ..schemas.config import CutoutConfig, Profile
from ..schemas.tables import CUTOUTS, rows_to_table
from .base import ModelUse, Stage, StageInputs, kept, rejected


def _under_root(path: str | None, models_root: str | None) -> str | None:
    """Relative cutout paths are relative to the profile's models_root (like every model reference)."""
    if path is None:
        return None
    if not os.path.isabs(path) and models_root is not None:
        path = os.path.join(models_root, path)
    return os.path.abspath(path)


def load_remover(cfg: CutoutConfig, models_root: str | None):
    from ..models.cutout import BackgroundRemover

    home = _under_root(cfg.home, models_root)
    model_path = _under_root(cfg.model_path, models_root)
    providers = tuple(cfg.providers or ())
    return resident.get(("cutout", cfg.model, model_path, home, cfg.device, providers),
                        lambda: BackgroundRemover.load(cfg.model, model_path=model_path, home=home, device=cfg.device,
                                                       providers=providers or None))


def cutout_rows(rows: pa.Table, originals: list, edits: list, cfg: CutoutConfig, get_remover) -> pa.Table:
    """One row per (item, candidate) row of `rows`; an item's original is cut out once for all its edits."""
    ids, cands = rows.column("item_id").to_pylist(), rows.column("candidate").to_pylist()
    out, todo, first_original = {}, [], {}
    for iid, c, a, b in zip(ids, cands, originals, edits):
        try:
            original = decode_image(a)
            todo.append((iid, c, decode_image(b)))
            first_original.setdefault(iid, original)
        except BadImage as exc:
            out[iid, c] = rejected(iid, str(exc), candidate=c)
    if todo:
        from ..models.cutout import composite_on_white, foreground_ratio

        remover = get_remover()
        unique = list(first_original)
        images = [first_original[i] for i in unique] + [b for _, _, b in todo]

        # Masks only on the model's thread; a remover offering just remove() composites there too.
        masks = getattr(remover, "masks", None)

        def run(batch):
            return masks(batch, cfg.batch_size) if masks is not None else remover.remove(batch)

        def finish(batch, _, result):  # compositing, ratios and PNG encoding overlap the next batch
            pairs = [(composite_on_white(im, m), m) for im, m in zip(batch, result)] if masks is not None else result
            return [(encode_png(fg), encode_png(m), foreground_ratio(m)) for fg, m in pairs]

        done = [r for part in pipelined(chunks(images, cfg.batch_size), run, finish=finish) for r in part]
        by_original = dict(zip(unique, done[: len(unique)]))
        for (iid, c, _), (fg1, m1, r1) in zip(todo, done[len(unique):]):
            fg0, m0, r0 = by_original[iid]
            common = dict(candidate=c, original_fg_ratio=r0, edited_fg_ratio=r1, model_id=remover.model_id)
            # Both sides need a subject: the cut-outs feed the filter and the foreground rewards.
            empty = [(side, r) for side, r in (("original", r0), ("edited", r1)) if r <= cfg.min_fg_ratio]
            if empty:
                detail = ", ".join(f"{side} foreground ratio {r:.3f}" for side, r in empty)
                out[iid, c] = rejected(iid, f"empty_foreground: {detail} <= cutout.min_fg_ratio={cfg.min_fg_ratio}",
                                       **common)
            else:
                out[iid, c] = kept(iid, original_cutout=fg0, edited_cutout=fg1, original_mask=m0, edited_mask=m1,
                                   **common)
    return rows_to_table([out[k] for k in zip(ids, cands)], CUTOUTS)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.cutout
    originals = inputs.lookup("sample", ["image"]).column("image").to_pylist()
    edits = inputs.rows.column("image").to_pylist()
    rows = inputs.rows.select(["item_id", "candidate"])
    return cutout_rows(rows, originals, edits, cfg, lambda: load_remover(cfg, profile.models_root))


STAGE = Stage(name="cutout", version="3", section="cutout", reads=("edit", "sample"), compute=compute, schema=CUTOUTS,
              models=lambda p: [ModelUse("cutout.model", p.cutout.model, "rembg", p.cutout)],
              load=lambda p: [load_remover(p.cutout, p.models_root).model_id])
