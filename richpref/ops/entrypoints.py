"""Flows are started by their entrypoints, `flows/<name>.py:<flow>`, the names prefect.yaml uses.

`flows/` sits next to `richpref/`: in a clone and an editable install that is the repository root,
in a wheel install site-packages (pyproject ships `flows` as a package beside `richpref`). The
library never imports a flow at import time; commands resolve one here when they start it.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]

CURATE = "flows/curate.py:curate"
FINETUNE = "flows/finetune.py:finetune"
EVALUATE = "flows/evaluate.py:evaluate"
ROUNDS = "flows/rounds.py:rounds"


def module_of(entrypoint: str) -> tuple[str, str]:
    """("flows.curate", "curate") for "flows/curate.py:curate"."""
    path, _, name = entrypoint.rpartition(":")
    if not path.endswith(".py") or not name:
        raise ValueError(f"entrypoint {entrypoint!r} is not of the form flows/<name>.py:<flow>")
    return path[: -len(".py")].replace("/", "."), name


def load_module(entrypoint: str):
    """The module of the flow at `entrypoint`, imported as part of the `flows` package (so its tasks
    pickle by import path and a flow imported twice is one object)."""
    module, _ = module_of(entrypoint)
    if not (PROJECT_DIR / entrypoint.rpartition(":")[0]).exists():
        raise FileNotFoundError(f"flow {entrypoint!r} not found under {PROJECT_DIR}: reinstall richpref "
                                "(`pip install -e .` in a clone) so that flows/ ships beside richpref/")
    if str(PROJECT_DIR) not in sys.path:  # a clone used without installing it
        sys.path.append(str(PROJECT_DIR))
    return importlib.import_module(module)


def load_flow(entrypoint: str):
    """The flow object at `entrypoint`."""
    return getattr(load_module(entrypoint), module_of(entrypoint)[1])


def run_flow(flow, *, api_host: str = "127.0.0.1", api_url_host: str | None = None, while_server_starts=None,
             spawned_server=None, **params):
    """Run `flow` (an entrypoint such as CURATE, or a flow object) with `params`, under a Prefect API
    this process owns: an ephemeral server it starts for the run dies with it (Dask workers use it too;
    `api_host`: the address it listens on, for workers on other nodes). `while_server_starts(url)`:
    called once the server is spawned, before it answers. `spawned_server`: the server the command
    spawned earlier for this run (richpref.ops.prefect_api.spawn_server), used and stopped here."""
    from richpref.ops.prefect_api import owned_prefect_api

    fn = load_flow(flow) if isinstance(flow, str) else flow
    with owned_prefect_api(host=api_host, url_host=api_url_host, meanwhile=while_server_starts,
                           spawned=spawned_server):
        return fn(**params)
