"""The VLM engines (`engine:` of critique, instruct, filter and the VLM rewards): one declaration per
engine, found by walking this package.

Each module declares one way a VLM runs as `KINDS = (VLMEngine(...),)`: its kind, how a profile
selects it (`engine.backend`, and `engine.launch: <kind>` for a server richpref starts), how its model
or client is loaded (a `module:callable` of richpref/models), and for a launched server its command
line, what to install when it is missing, how it names the model and its option for images per
request. The config's allowed `engine.backend` and `engine.launch` values (schemas/serving.py), the
launcher (models/vlm_server.py), the client (models/vlm_client.py) and the one switch that loads a
VLM for the stages and the chat judges (models/vlm_engine.py) read `VLM_ENGINES`; nothing else lists
the engines.

Adding a VLM backend that speaks the OpenAI API: its declaration here, one file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..plugins import discover

__all__ = ["BACKENDS", "CHAT_LAUNCHERS", "LAUNCHERS", "VLMEngine", "VLM_ENGINES", "engine_of"]


@dataclass(frozen=True)
class VLMEngine:
    kind: str  # the `engine.launch` value of a launched server, else the engine's own name
    backend: str  # the `engine.backend` that selects it: transformers (in this process) | server
    # `module:callable` of richpref.models: callable(engine, model_ref, models_root, *, device, dtype,
    # trust_remote_code, image_caps, max_new_tokens) -> a VLM (generate_detailed, expected_score, ...).
    # Empty for richpref's judge server: a head judge's own reward loader is its client (rewards/served_head.py).
    loader: str = ""
    rank: int = 0  # its place in listings and messages
    launched: bool = False  # richpref starts it on the worker's device (`engine.launch: <kind>`)
    head: bool = False  # serves a reward head's value (the head judges), not chat answers
    # Its command line without the user's `extra_args`: command(model_path, served_name, host_args, *,
    # device, dtype, trust_remote_code, extra_args, max_model_len) -> argv.
    command: Callable[..., list[str]] | None = None
    install: str = ""  # what to do when its executable is missing or fails
    served_by_path: bool = False  # names the model by the path it serves (not `engine.served_model`)
    images_flag: str | None = None  # its option for images per request (value {"image": n}), raised for the multi-image judges


def _ranked(found: dict[str, VLMEngine]) -> dict[str, VLMEngine]:
    return dict(sorted(found.items(), key=lambda kv: (kv[1].rank, kv[0])))


def _discover() -> dict[str, VLMEngine]:
    return _ranked(discover(__name__, __path__, "VLM engine"))


VLM_ENGINES: dict[str, VLMEngine] = _discover()
BACKENDS: tuple[str, ...] = tuple(dict.fromkeys(d.backend for d in VLM_ENGINES.values()))
LAUNCHERS: tuple[str, ...] = tuple(k for k, d in VLM_ENGINES.items() if d.launched)
CHAT_LAUNCHERS: tuple[str, ...] = tuple(k for k in LAUNCHERS if not VLM_ENGINES[k].head)


def engine_of(engine) -> VLMEngine:
    """The declaration an `EngineConfig` selects (None: the default, in this process)."""
    backend = engine.backend if engine is not None else BACKENDS[0]
    launch = engine.launch if engine is not None else None
    for decl in VLM_ENGINES.values():
        if decl.backend == backend and (decl.kind == launch if decl.launched else launch is None):
            return decl
    raise ValueError(f"no VLM engine for engine.backend={backend} engine.launch={launch}")
