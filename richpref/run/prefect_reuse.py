"""What the Prefect task runs of one process can share instead of rebuilding per run.

A shard task on a Dask worker is a Prefect task run that starts from the flow's serialized context.
Prefect (3.9) rebuilds, for every such run, things that are the same for all of them
(docs/benchmarks.md, "Prefect's cost per task run on a Dask worker"):

- its settings, validated again from the serialized dict: environment, .env and TOML sources read
  anew, about 30 ms of CPU;
- a TLS context for each of its two API clients, loading certifi's CA bundle: about 28 ms each
  with OpenSSL 3.

The flow's side pays per submitted shard too: Prefect dumps the settings into the shard's context
(about 16 ms of CPU), and Dask hashes the whole submission to name it (about 12 ms), though Prefect
gives every task run a fresh id, so that name is unique anyway. Dumping the flow's result store into
that context, Prefect asks its storage block which fields hold secrets, which builds the block class's
JSON schema anew for each field (about 0.3 ms a submission).

`reuse_prefect_setup()` makes a process build each once: the task runs of a process share one
settings object per distinct serialized settings (the object that dict validated into the first
time), and Prefect's clients share one verifying TLS context per CA file (CPython's SSLContext holds
no connection and is safe to share between threads). The insecure context
(PREFECT_API_TLS_INSECURE_SKIP_VERIFY), made without a CA file and then changed by Prefect, is
left as it is. Whether a field of a block class holds secrets is found once per class and field.
A settings context is dumped once and its dump copied for each submission (Prefect
makes a new settings object for every change, `temporary_settings`; one changed in place after its
first dump would be sent as it was). Task runs submitted to Dask go sealed
(richpref/run/dask_submission.py), under a key of their run id instead of a hash of their arguments;
other Dask submissions keep theirs. Where Prefect's modules no longer have the names replaced here,
nothing is changed.
"""
from __future__ import annotations

import copy
import functools
import json
import ssl
import threading
import types

_lock = threading.Lock()


# TLS contexts -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _shared_context(purpose: ssl.Purpose, cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(purpose, cafile=cafile)


def create_default_context(purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, *, cafile=None, capath=None,
                           cadata=None) -> ssl.SSLContext:
    """`ssl.create_default_context`, shared per (purpose, CA file) when only a CA file is given."""
    if cafile is None or capath is not None or cadata is not None:
        return ssl.create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)
    with _lock:  # one load per CA file, even when the first clients are made at once
        return _shared_context(purpose, str(cafile))


def _share_tls_context() -> bool:
    import prefect.client.orchestration as orchestration

    current = getattr(orchestration, "ssl", None)
    if isinstance(current, types.SimpleNamespace):
        return True
    if current is not ssl:
        return False
    orchestration.ssl = types.SimpleNamespace(**{**vars(ssl), "create_default_context": create_default_context})
    return True


# settings -----------------------------------------------------------------------------------------
_settings: dict[str, object] = {}


def settings_for(settings_context: dict):
    """The settings object `SettingsContext(**settings_context)` validates, made once per distinct dict."""
    from prefect.context import SettingsContext

    key = json.dumps(settings_context, sort_keys=True, default=repr)
    with _lock:
        if key not in _settings:
            if len(_settings) >= 8:
                _settings.clear()
            _settings[key] = SettingsContext(**settings_context).settings
        return _settings[key]


def _with_shared_settings(hydrate):
    @functools.wraps(hydrate)
    def hydrated_context(serialized_context=None, client=None):
        given = (serialized_context or {}).get("settings_context")
        if isinstance(given, dict) and isinstance(given.get("settings"), dict):
            serialized_context = {**serialized_context,
                                  "settings_context": {**given, "settings": settings_for(given)}}
        return hydrate(serialized_context, client)

    return hydrated_context


# the flow's side: what each submission to Dask dumps and hashes ----------------------------------
_dumps: dict[tuple[int, bool], tuple[object, object, dict]] = {}


def _dumped_once(serialize):
    @functools.wraps(serialize)
    def dump(self, include_secrets: bool = True) -> dict:
        key = (id(self), include_secrets)
        with _lock:
            held = _dumps.get(key)
            if held is None or held[0] is not self or held[1] is not self.settings:
                if len(_dumps) >= 8:
                    _dumps.clear()
                # the context and its settings are held, so their ids are not reused while cached
                held = _dumps[key] = (self, self.settings, serialize(self, include_secrets=include_secrets))
        return copy.deepcopy(held[2])  # each submission gets its own, as from Prefect

    return dump


def _secrets_once_per_field(has_secrets):
    found: dict[tuple[type, str], bool] = {}

    @functools.wraps(has_secrets)
    def field_has_secrets(self, field_name: str) -> bool:
        key = (type(self), field_name)  # from the class's JSON schema: the same for all its blocks
        if key not in found:
            found[key] = has_secrets(self, field_name)
        return found[key]

    return field_has_secrets


def _wrap_once(owner, name: str, wrap) -> bool:
    """Replace `owner.name` (a module's function, a class's own method) by `wrap(it)`, once per
    process. False where Prefect no longer has it."""
    current = vars(owner).get(name)
    if current is None:
        return False
    if not getattr(current, "richpref_wrapped", False):
        wrapped = wrap(current)
        wrapped.richpref_wrapped = True
        setattr(owner, name, wrapped)
    return True


def reuse_prefect_setup() -> bool:
    """Share settings and TLS contexts between the Prefect task runs of this process, a settings dump
    between the submissions of a flow, and which fields of a block class hold secrets (idempotent).
    False where Prefect's modules changed and something could not be shared."""
    import prefect.task_engine as task_engine
    from prefect.blocks.core import Block
    from prefect.context import SettingsContext

    shared = [_share_tls_context(), _wrap_once(task_engine, "hydrated_context", _with_shared_settings),
              _wrap_once(SettingsContext, "serialize", _dumped_once),
              _wrap_once(Block, "_field_has_secrets", _secrets_once_per_field)]
    try:
        from prefect_dask.client import PrefectDaskClient
    except ImportError:  # no Dask extra: nothing submits to Dask
        return all(shared)
    from richpref.run.dask_submission import sealed_submit

    return all(shared) and _wrap_once(PrefectDaskClient, "submit", sealed_submit)
