"""Where models come from and how long they stay in memory.

A model reference in a profile is either a local directory (absolute, or relative to the profile's
`models_root`) or a Hugging Face Hub id. Offline, a Hub id that is not in the local cache fails at
once with a message naming the model and how to provide it.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported where a device, a dtype or a model is touched: planning and inspecting a
    import torch   # run import this module and never do

# transformers (>= 5.2x, with the `kernels` package installed) swaps layers of a model loaded on CUDA
# for kernels it downloads from the Hub at load time: an offline GPU node then cannot load LLaVA or a
# pipeline's text encoders at all, and online, a run's numerics depend on what the Hub served that day.
# Off unless the user asks for them (USE_HUB_KERNELS=YES).
os.environ.setdefault("USE_HUB_KERNELS", "NO")


class ModelNotAvailable(RuntimeError):
    """A model reference that resolves neither to a local directory nor to a reachable Hub id."""

    exit_code = 3  # what a command that refuses it exits with (richpref/cli/errors.py)


def resolve_model_ref(ref: str, models_root: str | os.PathLike | None = None) -> str:
    """Return a local path for `ref` if one exists, else `ref` itself (a Hub id).

    Offline (HF_HUB_OFFLINE=1) a Hub id missing from the local cache raises ModelNotAvailable
    immediately instead of letting the loader retry.
    """
    candidates = []
    p = Path(ref).expanduser()
    if p.is_absolute():
        candidates.append(p)
    else:
        if models_root is not None:
            candidates.append(Path(models_root).expanduser() / ref)
        candidates.append(Path.cwd() / ref)
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    if p.is_absolute() or ref.startswith((".", "~")) or ref.count("/") != 1:
        raise ModelNotAvailable(
            f"model {ref!r} not found (looked in {', '.join(str(c) for c in candidates)}). "
            "Give a local directory or a Hub id 'owner/name'; for the tiny profile run "
            "'richpref models build-tiny <models_root>'."
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(ref, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any miss means "not cached"
            raise ModelNotAvailable(
                f"model {ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1. "
                f"Download it on a connected machine (huggingface-cli download {ref}) and copy the cache, "
                "or point the profile at a local directory."
            ) from exc
    return ref


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU; a name torch does not know is a ValueError."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"{device!r} is no device name (auto, cpu, cuda, cuda:1, mps)") from exc


def device_missing(device: torch.device) -> str | None:
    """Why this machine cannot run on `device` (None when it can): asked before any model loads."""
    import torch

    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            return "torch sees no CUDA device here"
        if device.index is not None and device.index >= count:
            return f"this machine has {count} CUDA device(s)"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "torch sees no MPS device here"
    return None


def device_problem(name: str) -> str | None:
    """Why this machine cannot run on the device named `name` (not a device name, or none such here);
    None when it can. Asked before any model loads."""
    try:
        return device_missing(resolve_device(name))
    except ValueError as exc:
        return str(exc)


def start_process(devices: set[str]) -> None:
    """What a process pays once before its first model, whichever model that is: importing the model
    libraries and starting each accelerator (its context, the first kernel). Timed apart, the first
    model stage's load is its own; charged to it, a swap back to that stage looked as slow as a start."""
    import torch

    from richpref.models.libraries import import_model_libraries

    import_model_libraries()
    for name in sorted(devices):
        device = resolve_device(name)
        if device.type != "cpu":
            x = torch.ones(64, 64, device=device)
            (x @ x).sum().item()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' = float16 on GPU, float32 on CPU (half precision is slow or unsupported there)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


@contextlib.contextmanager
def peft_wrapping():
    """Around peft wrapping a transformers model: peft asks the model for transformers' deprecated
    `is_gradient_checkpointing`, whose FutureWarning is about peft's code, not the user's (it showed
    in `make demo` and in every merge of a judge's LoRA)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def keep_torch_threads():
    """Undo a library's change to torch's intra-op thread count (torch and numba share libgomp, and
    numba's OpenMP layer sets it to every core when it starts): oversubscribed cores make the small
    ops of a model run many times slower when several workers share a machine."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


class ResidentModel:
    """Holds at most one loaded model per process: asking for another releases the current one first.

    Stages run one after another, so one big model on the GPU at a time is enough and keeps memory flat.
    Two shards may compute at once in one process (two shards of a served-VLM stage on a Dask worker
    share its GPU slot): inside `shard()`, a thread asking for another model than the one a thread
    still computing a shard uses waits for that shard to end instead of releasing the model under it.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._key: Any = None
        self._model: Any = None
        self._users: dict[int, Any] = {}  # thread -> the key its current shard uses
        self._in_shard = threading.local()
        self.loads = 0  # models loaded by this process
        self.swaps = 0  # of which, loads that replaced another resident model

    @contextlib.contextmanager
    def shard(self):
        """Around one shard's computation: the model it gets stays resident until it ends."""
        self._in_shard.on = True
        try:
            yield
        finally:
            self._in_shard.on = False
            with self._changed:
                self._users.pop(threading.get_ident(), None)
                self._changed.notify_all()

    def _used_by_others(self, me: int) -> bool:
        return any(t != me and k == self._key for t, k in self._users.items())

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        me = threading.get_ident()
        with self._changed:
            while self._key != key and self._key is not None and self._used_by_others(me):
                self._changed.wait()
            if self._key != key:
                self.swaps += self._key is not None
                self.release()
                if self.loads == 0:
                    freeze_loaded_modules()
                self._model = load()
                self._key = key
                self.loads += 1
            if getattr(self._in_shard, "on", False):
                self._users[me] = key
            return self._model

    def __reduce__(self):
        # Pickled (e.g. inside a flow shipped to a Dask worker) as a reference to the receiving
        # process's own slot: a loaded model never travels between processes.
        return (_process_slot, ())

    def release(self, freeze_survivors: bool = False) -> None:
        """Drop the resident model and free what it held. `freeze_survivors`: at a stage's end in the
        process that runs the stages one after another (see free_accelerator_memory)."""
        with self._lock:
            if self._model is None and self._key is None:
                return  # nothing resident: a full gc.collect() here cost seconds per stage, for nothing
            hook = getattr(self._model, "on_release", None)
            if callable(hook):  # e.g. a served VLM stops the server it launched
                hook()
            self._model = None
            self._key = None
            free_accelerator_memory(freeze_survivors)


resident = ResidentModel()


def freeze_loaded_modules() -> None:
    """Once per process, before its first model load: the objects alive then (some 600,000 with torch,
    Prefect and Dask imported: modules, classes, functions, settings) move to the garbage collector's
    permanent generation. The full collection that frees a released model's reference cycles then walks
    the objects made since, not those: ~350 ms of CPU a release became ~10 ms (docs/benchmarks.md).
    Nothing is done where the process froze objects itself. Objects frozen here that later become
    cyclic garbage are not collected; they were alive before any model, so there are few of them."""
    import torch  # noqa: F401 - its objects (imported lazily, at the latest by the load) frozen with the rest

    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()
    freeze_at_exit()


@functools.cache  # once per process
def freeze_at_exit() -> None:
    """Once per process: at its exit, the objects still alive move to the permanent generation before
    Python's final garbage collection, which then does not walk them. That walk over what the
    imports and models left took a Dask worker about a second to stop (docs/benchmarks.md). Exit
    handlers registered later (Prefect's log and event flushes) run before it; what handlers make
    after it is collected as usual. Cyclic garbage frozen with the rest is not finalized, which
    Python does not promise at exit either."""
    atexit.register(gc.freeze)


def free_accelerator_memory(freeze_survivors: bool = False) -> None:
    """Free what dropped models left: their reference cycles, then the accelerator's cached blocks.
    `freeze_survivors`: then move the objects still alive to the permanent generation, as
    freeze_loaded_modules does before the first load, so that the next release's full collection walks
    only what was made after this one. Each stage imports its model libraries after that first freeze:
    each release of a tiny run walked 320,000-415,000 objects (0.18-0.22 s) to free a few hundred;
    with the freeze, 0.001-0.021 s after the first (docs/benchmarks.md). For a process whose
    survivors are the run's long-lived objects (the curate flow's between stages), not for a Dask
    worker's model swaps, where the tasks then in memory would stay frozen after they end."""
    gc.collect()
    if freeze_survivors:
        gc.freeze()
    torch = sys.modules.get("torch")  # not imported: no model was ever loaded, nothing is cached
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _process_slot() -> ResidentModel:
    return resident
