"""One TLS context per CA file for every Prefect client of a process.

Prefect (3.9) builds a new `ssl.SSLContext` from its CA file for every API client it makes, and a
task run on a Dask worker makes two clients (its settings context and its client context). Loading
certifi's bundle costs about 28 ms of CPU with OpenSSL 3, so a curate run on Dask spent about 55 ms
of CPU per shard task on it (docs/benchmarks.md). A verifying context holds only the trusted CAs
and options, never a connection, and CPython's SSLContext is safe to share between threads: the
clients of a process can use one. The insecure context (PREFECT_API_TLS_INSECURE_SKIP_VERIFY),
made without a CA file and then changed by Prefect, is left as it is.
"""
from __future__ import annotations

import functools
import ssl
import threading
import types

_lock = threading.Lock()


@functools.lru_cache(maxsize=8)
def _shared(purpose: ssl.Purpose, cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(purpose, cafile=cafile)


def create_default_context(purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, *, cafile=None, capath=None,
                           cadata=None) -> ssl.SSLContext:
    """`ssl.create_default_context`, shared per (purpose, CA file) when only a CA file is given."""
    if cafile is None or capath is not None or cadata is not None:
        return ssl.create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)
    with _lock:  # one load per CA file, even when the first clients are made at once
        return _shared(purpose, str(cafile))


def share_prefect_tls_context() -> bool:
    """Make this process's Prefect API clients share their verifying TLS context. Idempotent; False
    (nothing changed) when Prefect's client module no longer builds its contexts through `ssl`."""
    import prefect.client.orchestration as orchestration

    current = getattr(orchestration, "ssl", None)
    if isinstance(current, types.SimpleNamespace):
        return True
    if current is not ssl:
        return False
    orchestration.ssl = types.SimpleNamespace(**{**vars(ssl), "create_default_context": create_default_context})
    return True
