"""The model runtime: the one-resident-model slot frees memory when a model leaves it, and only then; Hub
kernels stay off unless the user turns them on."""
from __future__ import annotations

import gc

from richpref.models.runtime import ResidentModel


def test_release_collects_garbage_only_when_a_model_leaves(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(1) or 0)
    slot = ResidentModel()
    slot.release()  # nothing resident: a full collection here cost seconds per stage
    assert calls == []
    slot.get("a", lambda: object())
    assert calls == []  # the first load replaces nothing
    slot.get("b", lambda: object())
    assert calls == [1] and slot.swaps == 1
    slot.release()
    assert calls == [1, 1]


def _hub_kernels_enabled(env: dict) -> bool:
    """What transformers decides about Hub kernels in a fresh process that loaded richpref's runtime."""
    import subprocess
    import sys

    code = ("import richpref.models.runtime\n"
            "from transformers.integrations.hub_kernels import _kernels_enabled\n"
            "print(_kernels_enabled())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().endswith("True")


def test_hub_kernels_are_off_unless_the_user_turns_them_on():
    # Found on an H200: with `kernels` installed, LLaVA on CUDA fetched a Hub kernel at load time and an
    # offline node failed to load it.
    import os

    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    assert not _hub_kernels_enabled(env)
    assert _hub_kernels_enabled({**env, "USE_HUB_KERNELS": "YES"})
