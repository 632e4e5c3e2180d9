"""The one switch that loads a VLM for its engine (schemas/vlm_engines/): the VLM stages (critique,
instruct, check; tasks/critique.py) and the chat judges (vlm_score, unified_reward, edit_score) call
`load_vlm`, which calls the loader the engine declares: `in_process` below, or the OpenAI client
(`vlm_client.connect`, which launches the server first for a launched engine)."""
from __future__ import annotations

import importlib

from ..schemas.serving import EngineConfig, ImageCaps
from ..schemas.vlm_engines import engine_of


def in_process(engine: EngineConfig | None, model_ref: str, models_root: str | None = None, *, device: str = "auto",
               dtype: str = "auto", trust_remote_code: bool = False, image_caps: ImageCaps | None = None,
               max_new_tokens: int = 256):
    """`model_ref` loaded in this process (`max_new_tokens` sizes only a server's context)."""
    from .runtime import resolve_model_ref
    from .vlm import VisionLanguageModel

    return VisionLanguageModel.load(resolve_model_ref(model_ref, models_root), device=device, dtype=dtype,
                                    trust_remote_code=trust_remote_code, image_caps=image_caps)


def load_vlm(engine: EngineConfig | None, model_ref: str, models_root: str | None = None, *, device: str = "auto",
             dtype: str = "auto", trust_remote_code: bool = False, image_caps: ImageCaps | None = None,
             max_new_tokens: int = 256):
    """`model_ref` on `engine` (None: in this process): a `VisionLanguageModel` or a `ServedVLM`, which
    answer the same calls."""
    decl = engine_of(engine)
    if not decl.loader:
        raise ValueError(f"engine.launch={decl.kind} serves the head judges' values, not a chat VLM")
    module, attr = decl.loader.split(":")
    load = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
    return load(engine, model_ref, models_root, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                image_caps=image_caps, max_new_tokens=max_new_tokens)


__all__ = ["in_process", "load_vlm"]
