"""A Prefect API for one `richpref` command that dies with it.

Without PREFECT_API_URL, Prefect 3 starts an ephemeral server (`uvicorn … create_app`) in a child
process that outlives a SIGKILLed parent. `owned_prefect_api` starts the same server through
`richpref.common.procs.spawn_owned` instead (dies with this process, reaped on the next start if it did
not) and points PREFECT_API_URL at it. With PREFECT_API_URL set (a `richpref serve` or any Prefect
server), it changes nothing. `richpref curate` spawns it first thing (`spawn_server`, no Prefect
import needed), so that its start (3 s; 7 s on a fresh PREFECT_HOME, which migrates its database)
overlaps the command's own imports and checks.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from richpref.common.procs import free_port, spawn_owned, stop_owned, wait_healthy


# The task run recorder writes the task runs and their states from the events the clients send. By
# default it writes each event on its own, about 7 ms of the server's CPU each, three events a shard:
# it fell behind a run, and what it had not written when the server stopped was lost (300 quick task
# runs: 29 recorded, 11 of them left Running or Pending). Written in batches, once a second or every 500
# events, a shard costs the server 60% less, and the last batch is written as it stops.
RECORDER_BATCHES = {"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "500",
                    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1"}


def server_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """The command Prefect's own ephemeral server runs (uvicorn on the API app factory, UI off)."""
    # Found without importing Prefect (a second of imports): a command spawns this first thing.
    prefect_dir = importlib.util.find_spec("prefect").submodule_search_locations[0]
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect_dir).parent), "--factory",
            "prefect.server.api.server:create_app", "--host", host, "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


@dataclass
class SpawnedServer:
    """A Prefect server this process spawned and owns: its process and the URL to announce."""

    proc: subprocess.Popen
    url: str
    stopped: bool = False
    spawned_at: float = field(default_factory=time.time)

    def stop(self) -> None:
        if not self.stopped:  # once: a reaped server's process group id may belong to another group later
            self.stopped = True
            stop_owned(self.proc)


def spawn_server(log_path: str | None = None, host: str = "127.0.0.1", url_host: str | None = None,
                 settings_env: dict | None = None) -> SpawnedServer:
    """Spawn this command's own Prefect server now, without waiting for it (its start takes seconds:
    the caller goes on meanwhile). `settings_env`: this process's Prefect settings as environment
    variables, where they may differ from what the server reads itself (environment, PREFECT_HOME's
    profile); without them this needs no Prefect import, so a command can spawn it first thing."""
    port = free_port(host)
    env = {**RECORDER_BATCHES, **os.environ, **(settings_env or {}), "PREFECT_UI_ENABLED": "0",
           "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    proc = spawn_owned(server_command(port, host), name="prefect-server", log_path=log_path, env=env)  # errors only
    return SpawnedServer(proc, f"http://{url_host or ('127.0.0.1' if host in ('0.0.0.0', '::') else host)}:{port}/api")


@contextlib.contextmanager
def owned_prefect_api(log_path: str | None = None, timeout: float = 120.0, host: str = "127.0.0.1",
                      url_host: str | None = None, meanwhile=None, spawned: SpawnedServer | None = None):
    """Yield the Prefect API URL to use: the configured one, or a local server this process owns,
    listening on `host` (127.0.0.1: this machine only; an address of this node, or 0.0.0.0, for Dask
    workers on other nodes) and announced to the flow and its workers as `url_host` (default `host`).
    Its database is Prefect's: SQLite under PREFECT_HOME, or PREFECT_API_DATABASE_CONNECTION_URL.
    `spawned`: the server `spawn_server` started earlier for this, used instead of a new one.
    `meanwhile(url)`: called once the server is spawned, before it is waited for (its start takes
    seconds: a Dask cluster can start meanwhile)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if PREFECT_API_URL.value():
        if meanwhile is not None:
            meanwhile(PREFECT_API_URL.value())
        yield PREFECT_API_URL.value()
        return
    server = spawned or spawn_server(log_path, host, url_host,
                                     get_current_settings().to_environment_variables(exclude_unset=True))
    try:
        if meanwhile is not None:
            meanwhile(server.url)
        wait_healthy(server.url, "the Prefect server", server.proc, timeout, poll_s=0.1)
        os.environ["PREFECT_API_URL"] = server.url  # processes started from here (Dask workers) report to it too
        with temporary_settings({PREFECT_API_URL: server.url}):
            yield server.url
    finally:
        _drain_logs()  # queued flow-run logs reach the server before it stops
        _wait_recorded(server.url, server.spawned_at)
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


FINAL_STATES = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]


def _wait_recorded(url: str, since: float, timeout: float = 15.0, settle_s: float = 1.5) -> None:
    """Before the server stops: until it has written a final state for every task run of the flow runs
    started since `since`. Its recorder writes them from the events the clients sent, in batches, and
    the events it has not taken from its queue when it stops are lost: under load, 21 of 300 quick task
    runs were left without a state. Returns at once when all are written; stops waiting when their
    count has not moved for `settle_s` (task runs a crashed flow left unfinished), or after `timeout`."""
    import httpx

    flow_runs = {"start_time": {"after_": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(since - 1))}}
    final = {"flow_runs": flow_runs, "task_runs": {"state": {"type": {"any_": FINAL_STATES}}}}
    deadline, seen, moved = time.monotonic() + timeout, None, time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=5) as http:
            while time.monotonic() < deadline:
                counts = tuple(http.post("/task_runs/count", json=body).raise_for_status().json()
                               for body in ({"flow_runs": flow_runs}, final))
                if counts[0] == counts[1]:
                    return
                if counts != seen:
                    seen, moved = counts, time.monotonic()
                elif time.monotonic() - moved > settle_s:
                    return
                time.sleep(0.2)
    except (httpx.HTTPError, ValueError):  # a server that no longer answers: nothing more to wait for
        return


def _drain_logs() -> None:
    try:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
    except Exception:  # noqa: BLE001 - a log that cannot be sent must not mask the command's outcome
        pass
