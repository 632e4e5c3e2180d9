"""Prefect clients of a process share one verifying TLS context (richpref/run/prefect_tls.py)."""
from __future__ import annotations

import shutil
import ssl

import certifi
import prefect.client.orchestration as orchestration
from prefect.client.orchestration import SyncPrefectClient
from prefect.settings import PREFECT_API_SSL_CERT_FILE, temporary_settings

import richpref.run.shard_task  # noqa: F401 - importing the shard task shares the context, as on a worker
from richpref.run.prefect_tls import share_prefect_tls_context


def _count_context_loads(monkeypatch) -> list:
    made = []
    real = ssl.create_default_context

    def counting(*args, **kwargs):
        made.append(kwargs.get("cafile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    return made


def test_clients_of_a_process_load_the_ca_file_once(tmp_path, monkeypatch):
    cafile = tmp_path / "ca.pem"  # a CA file no earlier client of this process used
    shutil.copy(certifi.where(), cafile)
    made = _count_context_loads(monkeypatch)
    with temporary_settings({PREFECT_API_SSL_CERT_FILE: str(cafile)}):
        clients = [SyncPrefectClient("http://127.0.0.1:9/api") for _ in range(3)]
    assert made == [str(cafile)]
    for c in clients:
        c._client.close()


def test_other_contexts_are_not_shared():
    first = orchestration.ssl.create_default_context()
    assert first is not orchestration.ssl.create_default_context()  # Prefect changes this one (insecure)
    cafile = certifi.where()
    assert orchestration.ssl.create_default_context(cafile=cafile) is orchestration.ssl.create_default_context(
        cafile=cafile)
    assert orchestration.ssl.CERT_NONE is ssl.CERT_NONE and orchestration.ssl.SSLContext is ssl.SSLContext


def test_sharing_is_idempotent():
    assert share_prefect_tls_context() and share_prefect_tls_context()
    assert orchestration.ssl.create_default_context.__module__ == "richpref.run.prefect_tls"
