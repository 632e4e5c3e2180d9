"""The Prefect task runs of a process share their settings and TLS context (richpref/run/prefect_reuse.py)."""
from __future__ import annotations

import shutil
import ssl

import certifi
import prefect.client.orchestration as orchestration
import prefect.task_engine as task_engine
from prefect.client.orchestration import SyncPrefectClient
from prefect.context import SettingsContext, serialize_context
from prefect.settings import (PREFECT_API_SSL_CERT_FILE, PREFECT_TASKS_DEFAULT_RETRIES, get_current_settings,
                              temporary_settings)

import richpref.run.shard_task  # noqa: F401 - importing the shard task turns sharing on, as on a worker
from richpref.run.prefect_reuse import reuse_prefect_setup


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


def test_other_tls_contexts_are_not_shared():
    first = orchestration.ssl.create_default_context()
    assert first is not orchestration.ssl.create_default_context()  # Prefect changes this one (insecure)
    cafile = certifi.where()
    assert orchestration.ssl.create_default_context(cafile=cafile) is orchestration.ssl.create_default_context(
        cafile=cafile)
    assert orchestration.ssl.CERT_NONE is ssl.CERT_NONE and orchestration.ssl.SSLContext is ssl.SSLContext


def _settings_inside(serialized: dict):
    client = SyncPrefectClient("http://127.0.0.1:9/api")  # given, so that no API server is started
    try:
        with task_engine.hydrated_context(serialized, client):
            return get_current_settings()
    finally:
        client._client.close()


def test_task_runs_share_the_settings_their_serialized_context_validates_to():
    with temporary_settings({PREFECT_TASKS_DEFAULT_RETRIES: 7}):  # a value only this test sets
        serialized = serialize_context()
    first, second = _settings_inside(serialized), _settings_inside(serialized)
    assert first is second  # validated once
    assert first == SettingsContext(**serialized["settings_context"]).settings  # as Prefect validates it
    assert first.tasks.default_retries == 7
    other = _settings_inside(serialize_context())  # other settings: their own object
    assert other is not first and other.tasks.default_retries != 7


def test_sharing_is_idempotent():
    assert reuse_prefect_setup() and reuse_prefect_setup()
    assert orchestration.ssl.create_default_context.__module__ == "richpref.run.prefect_reuse"
    assert task_engine.hydrated_context.__wrapped__.__module__ == "prefect.context"


def test_a_flow_dumps_its_settings_once_for_all_its_submissions(monkeypatch):
    from prefect.context import ContextModel

    dumps = []
    real = ContextModel.serialize

    def counting(self, *args, **kwargs):
        if isinstance(self, SettingsContext):
            dumps.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ContextModel, "serialize", counting)
    with temporary_settings({PREFECT_TASKS_DEFAULT_RETRIES: 5}):
        first, second = serialize_context(), serialize_context()
        assert len(dumps) == 1
        assert first["settings_context"] == second["settings_context"]
        assert first["settings_context"] is not second["settings_context"]  # each its own copy
        first["settings_context"]["settings"]["tasks"]["default_retries"] = 0
        assert serialize_context()["settings_context"]["settings"]["tasks"]["default_retries"] == 5
        dumps.clear()
        monkeypatch.setattr(ContextModel, "serialize", real)
        assert serialize_context()["settings_context"] == SettingsContext.get().serialize.__wrapped__(
            SettingsContext.get())  # what Prefect itself dumps
    with temporary_settings({PREFECT_TASKS_DEFAULT_RETRIES: 6}):  # new settings: dumped again
        assert serialize_context()["settings_context"]["settings"]["tasks"]["default_retries"] == 6


def test_a_block_classs_secret_fields_are_found_once_per_field_and_still_kept_secret(monkeypatch):
    from prefect.blocks.core import Block
    from pydantic import SecretStr

    class ShardStoreCreds(Block):  # a class no earlier dump of this process saw
        user: str
        password: SecretStr

    schemas = []
    real = ShardStoreCreds.model_json_schema.__func__
    monkeypatch.setattr(ShardStoreCreds, "model_json_schema",
                        classmethod(lambda cls, *a, **kw: schemas.append(cls) or real(cls, *a, **kw)))
    creds = ShardStoreCreds(user="u", password="p")
    dumps = [creds.model_dump(context={"include_secrets": True}) for _ in range(5)]  # as a task's context
    assert len(schemas) == 2  # one per field, not one per field and dump
    assert dumps[-1] == dumps[0] and dumps[0]["user"] == "u" and dumps[0]["password"] == "p"
    assert creds.model_dump(context={"include_secrets": False})["password"] != "p"
    has_secrets = Block._field_has_secrets
    assert has_secrets(creds, "password") and not has_secrets(creds, "user")
    assert has_secrets.__wrapped__(creds, "password") and not has_secrets.__wrapped__(creds, "user")
