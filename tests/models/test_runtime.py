"""The one-resident-model slot frees memory when a model leaves it, and only then."""
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
