"""One curate over a real multi-node Dask cluster: two "nodes" as network namespaces joined by a veth
pair, a `dask scheduler` on node A, one `dask worker --resources GPU=1` on each node, the Prefect
server curate starts (`--prefect-host`) on PostgreSQL, the run folder on a filesystem both nodes see.

One worker is SIGKILLed while it holds a shard; the run completes, every shard is committed exactly
once, the pairs equal a local one-process run's, and no process is left. Needs root (network
namespaces) and PostgreSQL (`make test` installs Debian's `postgresql`); skipped only without root or
network namespaces. Traffic stays on loopback and inside the namespaces this module creates.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from richpref.storage import RunStore
from richpref.tasks import ALL_STAGES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TAG = f"{os.getpid() % 100000}"
NS = {"a": f"rp-a-{TAG}", "b": f"rp-b-{TAG}"}
IP = {"a": "10.224.24.1", "b": "10.224.24.2"}  # a test subnet that exists only inside the two namespaces
SCHEDULER = f"tcp://{IP['a']}:8786"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"  # inside node A
ARGS = ["--set", "source.limit=4", "--set", "source.shard_size=2"]
STAGES = [s.name for s in ALL_STAGES]
HOLD = "edit:0"  # the shard whose holder is killed


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=True, timeout=60)


def _netns_unavailable() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root to create network namespaces (two simulated nodes)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` (network namespaces)"
    probe = f"rp-probe-{TAG}"
    try:
        _sh("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"network namespaces unavailable here: {getattr(exc, 'stderr', exc)}"
    _sh("ip", "netns", "del", probe)
    return None


_WHY = _netns_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def _in(node: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", NS[node], *cmd]


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    if not found:
        pytest.fail(f"PostgreSQL's {name} not found: install it (`apt-get install postgresql`; `make test` does)")
    return found[-1]


@pytest.fixture(scope="module")
def nodes():
    """Two namespaces joined by a veth pair: node a (10.224.24.1) and node b (10.224.24.2)."""
    veth = {"a": f"rpa{TAG}", "b": f"rpb{TAG}"}
    try:
        for n in "ab":
            _sh("ip", "netns", "add", NS[n])
        _sh("ip", "link", "add", veth["a"], "type", "veth", "peer", "name", veth["b"])
        for n in "ab":
            _sh("ip", "link", "set", veth[n], "netns", NS[n])
            _sh(*_in(n, "ip", "addr", "add", f"{IP[n]}/24", "dev", veth[n]))
            _sh(*_in(n, "ip", "link", "set", veth[n], "up"))
            _sh(*_in(n, "ip", "link", "set", "lo", "up"))
        yield NS
    finally:
        for n in "ab":
            subprocess.run(["ip", "netns", "del", NS[n]], capture_output=True)  # removes the veth pair too


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait(check, what: str, timeout: float = 60.0, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args} exited with {p.returncode} while waiting for {what}"
        if check():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def _ok(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def cluster(nodes, tiny_models):
    """PostgreSQL and the Dask scheduler on node a, one GPU worker per node, a shared data folder; a
    local reference run computed meanwhile. Every process is stopped by pid at the end."""
    base = Path(tempfile.mkdtemp(prefix="richpref-multinode-"))
    base.chmod(0o755)  # postgres (not root) must reach its folder below
    data, pg = base / "data", base / "pg"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RICHPREF_TORCH_THREADS": "1",
           "OMP_NUM_THREADS": "1", "RICHPREF_LEASE_SECONDS": "5", "PREFECT_HOME": str(base / "prefect")}
    env.pop("PREFECT_API_URL", None)
    env.pop("RICHPREF_FAULTS", None)
    curate = [str(BIN / "richpref"), "--data-dir", str(data), "curate", "--models-root", str(tiny_models), *ARGS]
    procs: list[subprocess.Popen] = []
    logs = open(base / "servers.log", "w")
    reference = subprocess.Popen([*curate, "--run", "local"], env={**env, "PREFECT_HOME": str(base / "prefect-local")},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pg.mkdir()
        shutil.chown(pg, "postgres", "postgres")
        as_pg = ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups"]
        _sh(*as_pg, _pg_bin("initdb"), "-D", str(pg / "db"), "--auth=trust", "-U", "postgres", "--no-sync")
        procs.append(subprocess.Popen(_in("a", *as_pg, _pg_bin("postgres"), "-D", str(pg / "db"), "-k", str(pg),
                                          "-h", "127.0.0.1", "-p", "5432"), stdout=logs, stderr=logs))
        _wait(lambda: _ok(_in("a", _pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", "5432")), "PostgreSQL", procs=procs)
        procs.append(subprocess.Popen(_in("a", str(BIN / "dask"), "scheduler", "--host", IP["a"], "--port", "8786",
                                          "--no-dashboard"), env=env, stdout=logs, stderr=logs))
        workers = {}
        for n in "ab":  # sleeps in the held shard, so a test can kill its holder mid-shard
            workers[n] = subprocess.Popen(
                _in(n, str(BIN / "dask"), "worker", SCHEDULER, "--host", IP[n], "--name", f"node-{n}", "--nthreads",
                    "2", "--resources", "GPU=1", "--no-nanny", "--no-dashboard"),
                env={**env, "RICHPREF_FAULTS": f"{HOLD}:sleep-8"}, stdout=logs, stderr=logs)
            procs.append(workers[n])
        ready = ("from distributed import Client; c = Client('%s', timeout=30); c.wait_for_workers(2, timeout=60)"
                 % SCHEDULER)
        _sh(*_in("a", sys.executable, "-c", ready))
        out, err = reference.communicate(timeout=600)
        assert reference.returncode == 0, err[-3000:]
        yield {"base": base, "data": data, "env": env, "curate": curate, "workers": workers, "procs": procs}
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
        _stop(procs)
        logs.close()
        left = {n: subprocess.run(["ip", "netns", "pids", NS[n]], capture_output=True, text=True).stdout.split()
                for n in "ab"}
        for p in procs:
            assert p.poll() is not None
        shutil.rmtree(base, ignore_errors=True)
        assert left == {"a": [], "b": []}, f"processes left in the namespaces: {left}"


def _pairs(data: Path, run: str) -> dict[int, str]:
    store = RunStore(str(data), run)
    return {s: hashlib.sha256(Path(store.shard_path("pairs", s)).read_bytes()).hexdigest() for s in store.shards("pairs")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(1500)  # two tiny curates and the servers' start, on a shared 2-core machine
def test_a_curate_over_two_nodes_survives_a_killed_worker_and_equals_a_local_run(cluster):
    data, env = cluster["data"], cluster["env"]
    log = cluster["base"] / "curate.log"
    with open(log, "w") as sink:
        run = subprocess.Popen(_in("a", *cluster["curate"], "--run", "multi", "--dask-address", SCHEDULER,
                                   "--prefect-host", IP["a"]),
                               env={**env, "PREFECT_API_DATABASE_CONNECTION_URL": PG_URL},
                               stdout=sink, stderr=subprocess.STDOUT)
    stage, shard = HOLD.split(":")
    lease = Path(RunStore(str(data), "multi").stage_dir(stage)) / f"part-{int(shard):05d}.lease-0000"
    try:
        _wait(lease.exists, f"a worker to hold {HOLD}", timeout=600, procs=[run])
        holder = json.loads(lease.read_text())["pid"]
        victim = next(n for n, w in cluster["workers"].items() if w.pid == holder)
        os.kill(holder, signal.SIGKILL)  # the node's worker dies mid-shard
        run.wait(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        err = log.read_text()
        print(err[-6000:])
    assert run.returncode == 0, err[-4000:]
    assert "preflight: 2 worker(s), 2 with a GPU slot" in err
    cluster["workers"][victim].wait(timeout=10)
    assert not _alive(holder)
    # Each shard computed and committed exactly once (the killed holder never committed its shard).
    work = [(r["stage"], r["shard"]) for r in RunStore(str(data), "multi").read_log("work.jsonl")]
    assert sorted(work) == sorted((s, k) for s in STAGES for k in range(2)), work
    assert _pairs(data, "multi") == _pairs(data, "local") != {}
    # The flow ran against PostgreSQL: its flow run is recorded there.
    rows = subprocess.run(_in("a", _pg_bin("psql"), "-h", "127.0.0.1", "-U", "postgres", "-tAc",
                              "select count(*) from flow_run where name is not null"),
                          capture_output=True, text=True, check=True).stdout.strip()
    assert int(rows) >= 1
