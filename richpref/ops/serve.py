"""`richpref serve`: a local Prefect server on 127.0.0.1, work pools, deployments and a process worker.

Everything lives under the data dir (`<data>/.prefect-server`: SQLite database, settings), telemetry
is off, and Ctrl-C stops the worker and the server.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from richpref.common.procs import check_port_free, spawn_owned, stop_owned, wait_healthy
from richpref.common.objstore import state_dir
from richpref.ops.prefect_api import RECORDER_BATCHES

PROJECT_DIR = Path(__file__).resolve().parents[2]


def server_env(data_dir: str, host: str, port: int) -> dict[str, str]:
    env = {**RECORDER_BATCHES, **os.environ}
    env.update({
        "PREFECT_HOME": state_dir(data_dir, ".prefect-server"),  # a URL data dir: the user's cache
        "PREFECT_API_URL": f"http://{host}:{port}/api",
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_WORKER_QUERY_SECONDS": env.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
        "PREFECT_LOGGING_EXTRA_LOGGERS": "richpref",
        "RICHPREF_PROJECT_DIR": str(PROJECT_DIR),
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
    })
    return env


def _prefect() -> str:
    exe = Path(sys.executable).parent / "prefect"
    return str(exe) if exe.exists() else "prefect"


def start(data_dir: str = "data", host: str = "127.0.0.1", port: int = 4200, pools=("cpu", "gpu"),
          worker_pool: str | None = "cpu", deploy: bool = True, log=None) -> list[subprocess.Popen]:
    """Start server (+ pools, deployments, worker); returns the processes (server first)."""
    check_port_free(host, port)  # else a healthy server there would pass for the one started here
    env = server_env(data_dir, host, port)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    out = log or subprocess.DEVNULL
    # Server and worker die with this process (richpref.common.procs): a killed `richpref serve` leaves nothing.
    log_path = log.name if isinstance(getattr(log, "name", None), str) else os.devnull
    procs = [spawn_owned([_prefect(), "server", "start", "--host", host, "--port", str(port)], name="prefect-server",
                         env=env, log_path=log_path)]
    try:
        wait_healthy(env["PREFECT_API_URL"], "the Prefect server", procs[0], timeout=90.0, poll_s=0.5)
        for pool in pools:
            subprocess.run([_prefect(), "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env,
                           check=True, stdout=out, stderr=subprocess.STDOUT)
        if deploy:
            subprocess.run([_prefect(), "--no-prompt", "deploy", "--all"], env=env, cwd=PROJECT_DIR, check=True,
                           stdout=out, stderr=subprocess.STDOUT)
        if worker_pool:
            procs.append(spawn_owned([_prefect(), "worker", "start", "--pool", worker_pool], name="prefect-worker",
                                     env=env, log_path=log_path))
    except BaseException:
        stop(procs)
        raise
    return procs


def _shown(exe: str) -> str:
    """The command as the user types it from here: .venv/bin/prefect, not a bare `prefect` that is on
    no PATH until the virtual environment is activated."""
    if os.path.isabs(exe) and Path(exe).is_relative_to(Path.cwd()):
        return os.path.relpath(exe)
    return exe


def stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        stop_owned(p, timeout=20)


def serve_forever(**kwargs) -> int:
    procs = start(log=None if kwargs.pop("verbose", False) else subprocess.DEVNULL, **kwargs)
    env = server_env(kwargs.get("data_dir", "data"), kwargs.get("host", "127.0.0.1"), kwargs.get("port", 4200))
    print(f"Prefect server: {env['PREFECT_API_URL'][:-4]}  (UI and API)\n"
          f"Run:  PREFECT_API_URL={env['PREFECT_API_URL']} {_shown(_prefect())} deployment run 'curate/tiny' --watch\n"
          "Ctrl-C stops the worker and the server.", flush=True)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(procs)
