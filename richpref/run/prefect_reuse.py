"""What the Prefect task runs of one process can share instead of rebuilding per run.

A shard task on a Dask worker is a Prefect task run that starts from the flow's serialized context.
Prefect (3.9) rebuilds, for every such run, things that are the same for all of them
(docs/benchmarks.md, "Prefect's cost per task run on a Dask worker"):

- its settings, validated again from the serialized dict: environment, .env and TOML sources read
  anew, about 30 ms of CPU;
- a TLS context for each of its two API clients, loading certifi's CA bundle: about 28 ms each
  with OpenSSL 3.

`reuse_prefect_setup()` makes a process build each once: the task runs of a process share one
settings object per distinct serialized settings (the object that dict validated into the first
time), and Prefect's clients share one verifying TLS context per CA file (CPython's SSLContext holds
no connection and is safe to share between threads). The insecure context
(PREFECT_API_TLS_INSECURE_SKIP_VERIFY), made without a CA file and then changed by Prefect, is
left as it is. Where Prefect's modules no longer have the names replaced here, nothing is changed.
"""
from __future__ import annotations

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

    hydrated_context.richpref_shared_settings = True
    return hydrated_context


def _share_settings() -> bool:
    import prefect.task_engine as task_engine

    current = getattr(task_engine, "hydrated_context", None)
    if current is None:
        return False
    if not getattr(current, "richpref_shared_settings", False):
        task_engine.hydrated_context = _with_shared_settings(current)
    return True


def reuse_prefect_setup() -> bool:
    """Share settings and TLS contexts between the Prefect task runs of this process (idempotent).
    False where Prefect's modules changed and something could not be shared."""
    tls = _share_tls_context()
    settings = _share_settings()
    return tls and settings
