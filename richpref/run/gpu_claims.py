"""How much of a Dask worker's `GPU` slot (`dask worker --resources GPU=1`) a stage's shard claims.

A stage that loads a model on the worker claims the whole slot: one such shard at a time per GPU.
A VLM stage whose model is served (`engine.backend: server`) claims half of it, so a worker runs two
of its shards at once: the next shard's requests reach the server while the previous shard's last
ones finish and its output is written, instead of the server idling between shards. Two shards of
different served stages may share a worker too; the process's resident-model slot keeps each
shard's client until that shard ends (richpref/models/runtime.py). Model-free stages claim nothing.
"""
from __future__ import annotations

from richpref.schemas.config import Profile
from richpref.tasks.base import Stage

SERVED_SHARE = 0.5
# Stages whose one model is their section's VLM (critique, instruct, check).
SERVED_VLM_STAGES = frozenset({"critique", "instruct", "check"})


def gpu_claim(stage: Stage, profile: Profile | None) -> float:
    if not stage.loads_model:
        return 0.0
    engine = getattr(getattr(profile, stage.section, None), "engine", None)
    if stage.name in SERVED_VLM_STAGES and getattr(engine, "backend", None) == "server":
        return SERVED_SHARE
    return 1.0
