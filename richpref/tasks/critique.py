"""critique: image + prompt -> a critique of how the image misses its prompt (LLaVA-Critic)."""
from __future__ import annotations

import pyarrow as pa

from richpref.common.images import BadImage, decode_image
from ..models.runtime import resident
from ..models.vlm_engine import load_vlm as load_engine_vlm
from ..prompts import load_template, render, template_hash
from ..schemas.config import CritiqueConfig, Profile, VLMStageConfig
from ..schemas.tables import CRITIQUES, rows_to_table
from .base import ModelUse, Stage, StageInputs, kept, rejected
from .vlm_text import says_no_issues


def load_vlm(cfg: VLMStageConfig, models_root: str | None):
    """The stage's VLM on its engine (cfg.engine: in-process or an OpenAI-compatible server), kept resident."""
    caps = cfg.image if cfg.image.key_data() else None
    return resident.get(
        ("vlm", cfg.model, models_root, cfg.engine.model_dump_json(), caps, cfg.device, cfg.dtype, cfg.trust_remote_code),
        lambda: load_engine_vlm(cfg.engine, cfg.model, models_root, device=cfg.device, dtype=cfg.dtype,
                                trust_remote_code=cfg.trust_remote_code, image_caps=caps,
                                max_new_tokens=getattr(cfg, "max_new_tokens", 256)),
    )


def critique_reason(text: str, cfg: CritiqueConfig) -> str | None:
    """Why a critique cannot be used, or None."""
    if not (text or "").strip():
        return "empty_critique: the model returned no text"
    if cfg.reject_no_issues and says_no_issues(text):
        # Nothing to fix: instructions would have to invent content (RPO appendix D).
        return "no_issues: the critic found no misalignment to fix (critique.reject_no_issues)"
    return None


def critique_rows(rows: pa.Table, images: list, cfg: CritiqueConfig, get_vlm) -> pa.Table:
    template = load_template(cfg.template)
    out = {}
    todo = []
    for r, data in zip(rows.to_pylist(), images):
        try:
            todo.append((r, decode_image(data)))
        except BadImage as exc:
            out[r["item_id"]] = rejected(r["item_id"], str(exc), prompt=r["prompt"], template=cfg.template)
    if todo:
        vlm = get_vlm()
        gens = vlm.generate_detailed([img for _, img in todo], [render(template, prompt=r["prompt"]) for r, _ in todo],
                                     max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        for (r, _), g in zip(todo, gens):
            text = g.text
            common = dict(prompt=r["prompt"], raw=text, critique=text.strip(), template=cfg.template,
                          model_id=vlm.model_id)
            reason = g.error or critique_reason(text, cfg)
            out[r["item_id"]] = rejected(r["item_id"], reason, **common) if reason else kept(r["item_id"], **common)
    return rows_to_table([out[i] for i in rows.column("item_id").to_pylist()], CRITIQUES)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.critique
    images = inputs.lookup("sample", ["image"]).column("image").to_pylist()
    return critique_rows(inputs.rows, images, cfg, lambda: load_vlm(cfg, profile.models_root))


def vlm_models(section: str) -> dict:
    """A VLM stage's models (`Stage.models`, `Stage.load`): the VLM of its config section."""
    def models(profile: Profile) -> list[ModelUse]:
        cfg = getattr(profile, section)
        return [ModelUse(f"{section}.model", cfg.model, "vlm", cfg)]

    def load(profile: Profile) -> list[str]:
        return [load_vlm(getattr(profile, section), profile.models_root).model_id]

    return {"models": models, "load": load}


STAGE = Stage(name="critique", version="2", section="critique", reads=("sample",), compute=compute,
              key_extra=lambda p: template_hash(p.critique.template), schema=CRITIQUES, **vlm_models("critique"))
