"""The model runtime: the one-resident-model slot frees memory when a model leaves it, and only then; what
survives a stage's end is not walked again; Hub kernels stay off unless the user turns them on; a device
name torch does not know, or a device this machine lacks, is said before any model loads."""
from __future__ import annotations

import gc

import pytest
import torch

import richpref.models.runtime as runtime
from richpref.models.runtime import ResidentModel, device_missing, resolve_device


def test_release_collects_garbage_only_when_a_model_leaves(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(1) or 0)
    monkeypatch.setattr(runtime, "freeze_loaded_modules", lambda: None)  # tested below, in its own process
    slot = ResidentModel()
    slot.release()  # nothing resident: a full collection here cost seconds per stage
    assert calls == []
    slot.get("a", lambda: object())
    assert calls == []  # the first load replaces nothing
    slot.get("b", lambda: object())
    assert calls == [1] and slot.swaps == 1
    slot.release()
    assert calls == [1, 1]


FREEZE_CHECK = """
import gc, time, weakref
from richpref.models.runtime import ResidentModel, device_missing, resolve_device

class Model:  # a model whose parts point back at it: only a full collection frees it
    def __init__(self):
        self.parts = [self]

slot = ResidentModel()
gone = weakref.ref(slot.get("a", Model))  # made by its loader, after the freeze, as a model is
frozen = gc.get_freeze_count()
slot.get("b", Model)
print(frozen, gone() is None, gc.get_freeze_count() == frozen)
"""


def test_the_first_load_freezes_the_loaded_modules_and_released_models_are_still_freed():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FREEZE_CHECK], capture_output=True, text=True, check=True)
    frozen, freed, once = out.stdout.split()
    assert int(frozen) > 10_000  # torch's and richpref's modules, frozen before the first model
    assert freed == "True"  # the released model's cycle was collected: it was made after the freeze
    assert once == "True"  # the second load froze nothing more


STAGE_END_CHECK = """
import gc, weakref
from richpref.models.runtime import ResidentModel, device_missing, resolve_device

class Model:
    def __init__(self):
        self.parts = [self]

def tracked(obj):  # gc.get_objects() leaves out the permanent generation
    return any(o is obj for o in gc.get_objects())

slot = ResidentModel()
first = weakref.ref(slot.get("a", Model))
library = [{"made": "by the stage, after the first freeze"}]  # e.g. a module its model's library imported
slot.release(freeze_survivors=True)
second = weakref.ref(slot.get("b", Model))
swapped_in = [{"made": "during the second stage"}]
slot.get("c", Model)  # a swap inside a stage: collects, freezes nothing
print(first() is None, tracked(library), second() is None, tracked(swapped_in))
"""


def test_a_stage_end_release_frees_the_model_and_freezes_what_survives_it():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", STAGE_END_CHECK], capture_output=True, text=True, check=True)
    first_freed, library_walked, second_freed, swap_walked = out.stdout.split()
    assert first_freed == "True" and second_freed == "True"  # each released model's cycle was collected
    assert library_walked == "False"  # alive at the stage's end: no later collection walks it again
    assert swap_walked == "True"  # a swap's survivors stay collectable


EXIT_FREEZE_CHECK = """
import atexit, gc
import torch  # a process that loads models (the runtime imports it at the first)
from richpref.models.runtime import freeze_at_exit

atexit.register(lambda: print("at-exit", gc.get_freeze_count() > 10_000))  # runs after freeze_at_exit's
before = atexit._ncallbacks()
freeze_at_exit()
freeze_at_exit()
print("registered", atexit._ncallbacks() - before, "frozen-now", gc.get_freeze_count())
"""


def test_a_process_freezes_its_objects_at_exit_once_and_not_before():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", EXIT_FREEZE_CHECK], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["registered", "1", "frozen-now", "0", "at-exit", "True"]


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


def test_a_device_name_torch_does_not_know_or_a_device_this_machine_lacks_is_said(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'nosuch' is no device name \(auto, cpu, cuda, cuda:1, mps\)"):
        resolve_device("nosuch")  # before: torch's RuntimeError listing every device type it knows
    assert device_missing(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert device_missing(torch.device("cuda")) == "torch sees no CUDA device here"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the count a 2-GPU machine reports
    assert device_missing(torch.device("cuda")) is None and device_missing(torch.device("cuda:1")) is None
    assert device_missing(torch.device("cuda:2")) == "this machine has 2 CUDA device(s)"
