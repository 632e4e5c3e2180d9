"""The Prefect server a command owns (richpref/ops/prefect_api.py): what its runs leave recorded."""
from __future__ import annotations

import os
import subprocess
import sys

RUN = """
from prefect import flow, task
from richpref.ops.prefect_api import owned_prefect_api

@task
def quick(i):
    return i

@flow(name="recorded")
def many(n):
    return sum(f.result() for f in [quick.submit(i) for i in range(n)])

with owned_prefect_api():
    assert many(300) == sum(range(300))
"""

READ = """
import collections
from prefect import get_client
from richpref.ops.prefect_api import owned_prefect_api

with owned_prefect_api(), get_client(sync_client=True) as client:
    runs, offset = [], 0
    while True:
        page = client.read_task_runs(limit=200, offset=offset)
        runs, offset = runs + page, offset + 200
        if len(page) < 200:
            break
    print(dict(collections.Counter(r.state.type.value if r.state else None for r in runs)))
"""


def test_every_task_run_of_a_command_is_recorded_completed_once_its_server_stopped(tmp_path):
    # 300 task runs in a few seconds, then the command's server stops; a later server on the same
    # PREFECT_HOME finds them all. Written one event at a time (Prefect's default), 29 were recorded.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER")}
    env.pop("PREFECT_API_URL", None)
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    ran = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    read = subprocess.run([sys.executable, "-c", READ], env=env, capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    assert read.stdout.strip().splitlines()[-1] == "{'COMPLETED': 300}"
