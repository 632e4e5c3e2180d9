"""Flows are started by their entrypoints (`flows/curate.py:curate`, as in prefect.yaml), so no
module of the package imports a flow module."""
from __future__ import annotations

import functools
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
CURATE = "flows/curate.py:curate"


@functools.cache
def load_flow(entrypoint: str):
    """The flow object at `entrypoint` (a path relative to the project, then `:name`)."""
    from prefect.flows import load_flow_from_entrypoint

    path, name = entrypoint.rsplit(":", 1)
    return load_flow_from_entrypoint(f"{PROJECT_DIR / path}:{name}")
