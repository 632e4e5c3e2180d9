"""Editors behind one interface, chosen by `edit.kind`.

Every editor has `edit(images, prompts, seeds, *, batch_size, **settings) -> images` (RGB, each
input's size, input order, one CPU generator per item), `model_id`, `kind` and `close()`; `SETTINGS`
names the config fields its `edit` takes. Each kind is declared in richpref/schemas/editor_kinds/. The ControlNet names are re-exported here for the code that
imports them from this module.
"""
from __future__ import annotations

import importlib
from typing import Any

from .editors.controlnet import (  # noqa: F401 - re-exported
    ANNOTATOR_FILES,
    CONTROL_KINDS,
    ControlDetector,
    ControlNetEditor,
    annotator_network,
    annotator_state_dict,
    load_annotator_network,
    make_control_image,
)
from ..schemas.editor_kinds import EDITOR_KINDS
from .runtime import resident, resolve_model_ref


def _editor_class(decl) -> type:
    module, name = decl.editor.split(":")
    return getattr(importlib.import_module(f"{__package__}.editors.{module}"), name)


# kind -> its editor class, from the kinds' declarations (richpref/schemas/editor_kinds/).
EDITORS: dict[str, type] = {k: _editor_class(d) for k, d in EDITOR_KINDS.items()}


def editor_settings(cfg: Any) -> dict[str, Any]:
    """The settings `cfg` (an EditConfig) passes to its editor's `edit` at each call."""
    return {name: getattr(cfg, name) for name in EDITORS[cfg.kind].SETTINGS}


def load_editor(cfg: Any, models_root: str | None) -> Any:
    """The editor `cfg.kind` with `cfg.model` (a Hub id, or a folder under `models_root`), with the
    config's scheduler / compile / channels-last applied, kept resident in this process: the same
    config gets the loaded editor back."""
    from .generator import apply_pipeline_settings

    model = resolve_model_ref(cfg.model, models_root)
    settings = dict(scheduler=cfg.scheduler, compile=cfg.compile, channels_last=cfg.channels_last)
    set_ = tuple(settings.values()) if any(settings.values()) else ()  # a plain config keeps its old key

    def with_settings(editor: Any) -> Any:
        apply_pipeline_settings(editor.pipe, **settings)
        return editor

    if cfg.kind == "controlnet_img2img":
        controlnet = resolve_model_ref(cfg.controlnet, models_root)
        # Annotator weights only matter to the network controls; the others ignore them.
        weights = resolve_model_ref(cfg.control_weights, models_root) if cfg.control_weights else None
        return resident.get(
            ("editor", cfg.kind, model, controlnet, cfg.control, weights, cfg.device, cfg.dtype, *set_),
            lambda: with_settings(ControlNetEditor.load(model, controlnet, device=cfg.device, dtype=cfg.dtype,
                                                        control=cfg.control, control_weights=weights)),
        )
    cls = EDITORS[cfg.kind]
    return resident.get(("editor", cfg.kind, model, cfg.device, cfg.dtype, *set_),
                        lambda: with_settings(cls.load(model, device=cfg.device, dtype=cfg.dtype)))
