"""filter: a VLM checks each pair — instruction executed, no stray content, subject kept.

Each check is a yes/no question answered by the probability the VLM gives to "yes" over "no" at the
answer position, so the verdict never depends on parsing free text; thresholds are configurable.
"""
from __future__ import annotations

import pyarrow as pa

from ..images import BadImage, decode_image, side_by_side
from ..prompts import load_sections, render, template_hash
from ..schemas.config import FilterConfig, Profile
from ..schemas.tables import VERDICTS, rows_to_table
from .base import Stage, StageInputs, kept, rejected
from .critique import load_vlm

CHECKS = (("executed", "min_executed", "not_executed"),
          ("no_stray", "min_no_stray", "stray_content"),
          ("subject_kept", "min_subject_kept", "subject_changed"))


def verdict(p: dict[str, float], cfg: FilterConfig) -> str | None:
    """None to keep, else the reason naming every failed check."""
    failed = [f"{name}(p_yes={p[check]:.2f} < {getattr(cfg, attr)})"
              for check, attr, name in CHECKS if p[check] < getattr(cfg, attr)]
    return "filter: " + ", ".join(failed) if failed else None


def filter_rows(rows: pa.Table, prompts: list, instructions: list, images: dict[str, list], cfg: FilterConfig, get_vlm) -> pa.Table:
    sections = load_sections(cfg.template)
    out, todo = {}, []
    for k, iid in enumerate(rows.column("item_id").to_pylist()):
        try:
            pair = side_by_side(decode_image(images["original"][k]), decode_image(images["edited"][k]))
            cut = side_by_side(decode_image(images["original_cutout"][k]), decode_image(images["edited_cutout"][k]))
            todo.append((iid, prompts[k], "\n".join(f"- {s}" for s in instructions[k]), pair, cut))
        except BadImage as exc:
            out[iid] = rejected(iid, str(exc), verdict="drop", template=cfg.template)
    if todo:
        vlm = get_vlm()
        probs = {}
        for check, _, _ in CHECKS:
            imgs = [cut if check == "subject_kept" else pair for _, _, _, pair, cut in todo]
            texts = [render(sections[check], prompt=p, instructions=ins) for _, p, ins, _, _ in todo]
            probs[check] = vlm.option_probabilities(imgs, texts, ["yes", "no"], batch_size=cfg.batch_size)[:, 0]
        for k, (iid, *_rest) in enumerate(todo):
            p = {check: float(probs[check][k]) for check, _, _ in CHECKS}
            common = dict(p_executed=p["executed"], p_no_stray=p["no_stray"], p_subject_kept=p["subject_kept"],
                          template=cfg.template, model_id=vlm.model_id)
            reason = verdict(p, cfg)
            out[iid] = (rejected(iid, reason, verdict="drop", **common) if reason
                        else kept(iid, verdict="keep", **common))
    return rows_to_table([out[i] for i in rows.column("item_id").to_pylist()], VERDICTS)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.filter
    rows = inputs.rows
    images = {
        "original": inputs.lookup("sample", ["image"]).column("image").to_pylist(),
        "edited": inputs.lookup("edit", ["image"]).column("image").to_pylist(),
        "original_cutout": rows.column("original_cutout").to_pylist(),
        "edited_cutout": rows.column("edited_cutout").to_pylist(),
    }
    meta = inputs.lookup("instruct", ["prompt", "instructions"])
    return filter_rows(rows.select(["item_id"]), meta.column("prompt").to_pylist(),
                       meta.column("instructions").to_pylist(), images, cfg,
                       lambda: load_vlm(cfg, profile.models_root))


STAGE = Stage(name="filter", version="1", section="filter", reads=("cutout", "sample", "edit", "instruct"),
              compute=compute, key_extra=lambda p: template_hash(p.filter.template))
