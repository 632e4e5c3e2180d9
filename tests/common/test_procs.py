"""Whatever richpref starts dies with it: owned children, the pid registry, orphan reaping, and the
Prefect server of a SIGKILLed `richpref curate` (checked by pid and start time)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from richpref.common import procs

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


@pytest.fixture
def registry(tmp_path, monkeypatch):
    path = tmp_path / "pids"
    path.mkdir()
    monkeypatch.setenv(procs.PID_DIR_ENV, str(path))
    return path


def _alive(pid: int, started: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and abs(p.create_time() - started) < 0.05
    except psutil.NoSuchProcess:
        return False


def _gone_within(pids: dict[int, float], seconds: float) -> dict[int, float]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = {p: t for p, t in pids.items() if _alive(p, t)}
        if not left:
            return {}
        time.sleep(0.1)
    return left


def test_spawn_registers_and_stop_kills_the_group_and_forgets_it(registry, tmp_path):
    # The child starts a grandchild in its group: stopping the child ends both.
    proc = procs.spawn_owned(["sh", "-c", "sleep 60 & echo started; wait"], name="sleeper",
                             log_path=str(tmp_path / "out.log"))
    record = json.loads((registry / f"{proc.pid}.json").read_text())
    assert record["pid"] == proc.pid and record["name"] == "sleeper" and record["parent_pid"] == os.getpid()
    assert record["cmd"][:2] == ["sh", "-c"] and record["start_time"] == pytest.approx(psutil.Process(proc.pid).create_time())
    assert os.getpgid(proc.pid) == proc.pid  # its own process group
    deadline = time.monotonic() + 10
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    family = {p.pid: p.create_time() for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children()]}
    assert len(family) == 2
    procs.stop_owned(proc, timeout=5)
    assert not _gone_within(family, 5)
    assert not (registry / f"{proc.pid}.json").exists()
    assert (tmp_path / "out.log").read_text().strip() == "started"


OWNER = textwrap.dedent("""
    import sys, threading, time
    from richpref.common.procs import spawn_owned
    # spawned from a thread that ends at once: the child must still live as long as this process
    t = threading.Thread(target=lambda: print(spawn_owned(["sleep", "60"], name="child").pid, flush=True))
    t.start(); t.join()
    time.sleep(60)
""")


def _owner(registry: Path) -> tuple[subprocess.Popen, int, float]:
    env = {**os.environ, procs.PID_DIR_ENV: str(registry), "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen([sys.executable, "-c", OWNER], env=env, stdout=subprocess.PIPE, text=True)
    child = int(owner.stdout.readline())
    return owner, child, psutil.Process(child).create_time()


def test_a_child_dies_with_its_owner_on_sigkill(registry):
    owner, child, started = _owner(registry)
    time.sleep(0.5)
    assert _alive(child, started)  # outlived the thread that spawned it
    owner.kill()
    owner.wait()
    assert not _gone_within({child: started}, 5), "the owned child survived its owner's SIGKILL"


def test_reap_orphans_kills_children_of_dead_owners_and_never_a_recycled_pid(registry):
    mine = procs.spawn_owned(["sleep", "60"], name="mine")  # a child of a live owner (this process): left alone
    # An orphan whose PDEATHSIG never fired (started without it), recorded under an owner that has exited.
    owner = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = int(owner.stdout)
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    started = psutil.Process(orphan.pid).create_time()
    # A live process whose pid a stale record names with another start time (the pid was recycled).
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    for pid, t in ((orphan.pid, started), (bystander.pid, started - 1000.0)):
        (registry / f"{pid}.json").write_text(json.dumps({"pid": pid, "start_time": t, "name": "x", "cmd": ["sleep"],
                                                          "parent_pid": dead_owner, "parent_start_time": 1.0}))
    try:
        assert procs.reap_orphans() == [orphan.pid]
        orphan.wait(timeout=5)
        assert bystander.poll() is None and mine.poll() is None
        assert sorted(p.name for p in registry.glob("*.json")) == [f"{mine.pid}.json"]
    finally:
        bystander.kill()
        bystander.wait()
        procs.stop_owned(mine)


def test_sigkilled_curate_leaves_no_prefect_server(registry, tiny_models, tmp_path):
    """`richpref curate` killed mid-run: no process it started (its Prefect server above all) survives."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API") and k != "RICHPREF_FAULTS"}
    env.update({procs.PID_DIR_ENV: str(registry), "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")})
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "richpref.cli.commands", "--data-dir", str(data), "curate", "--run", "killed",
           "--models-root", str(tiny_models), "--set", "source.limit=2", "--set", "source.shard_size=2"]
    curate = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        server = None
        while time.monotonic() < deadline and curate.poll() is None:
            kids = psutil.Process(curate.pid).children(recursive=True)
            server = next((p for p in kids if "prefect.server.api.server:create_app" in " ".join(p.cmdline())), None)
            if server and (data / "runs" / "killed" / "run.json").exists():  # the flow has started: kill now
                break
            time.sleep(0.2)
        assert server is not None and curate.poll() is None, "curate never started its Prefect server and flow"
        family = {p.pid: p.create_time() for p in psutil.Process(curate.pid).children(recursive=True)}
        curate.send_signal(signal.SIGKILL)
        curate.wait()
        left = _gone_within(family, 10)
        assert not left, f"processes of the killed curate still run: {[psutil.Process(p).cmdline() for p in left]}"
    finally:
        if curate.poll() is None:
            curate.kill()
            curate.wait()


def test_a_free_port_is_free_and_a_listened_port_is_in_use():
    port = procs.free_port()
    assert not procs.port_in_use("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert procs.port_in_use("127.0.0.1", port)
