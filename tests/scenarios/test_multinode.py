"""One curate over a real multi-node Dask cluster: two "nodes" as network namespaces joined by a veth
pair, a `dask scheduler` on node A, one `dask worker --resources GPU=1` on each node, the Prefect
server curate starts (`--prefect-host`) on PostgreSQL, the run folder on S3 (a moto server on node A,
which both nodes reach over the veth pair; every process gets the key and endpoint in the AWS_*
variables, as a user exports them).

One worker is SIGKILLed while it holds a shard; the run completes, every shard is committed exactly
once, the pairs equal a local one-process run's (the session's small_reference: the same small run on a
local folder, tests/conftest.py), and no process is left. Needs root (network
namespaces) and PostgreSQL (`make test` installs Debian's `postgresql`); skipped only without root or
network namespaces. Traffic stays on loopback and inside the namespaces this module creates (this
process reads the S3 run through a helper started on node A).
"""
from __future__ import annotations

import glob
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

from richpref.tasks import ALL_STAGES
from run_sizes import SMALL_ARGS
from s3_server import S3Server

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TAG = f"{os.getpid() % 100000}"
NS = {"a": f"rp-a-{TAG}", "b": f"rp-b-{TAG}"}
IP = {"a": "10.224.24.1", "b": "10.224.24.2"}  # a test subnet that exists only inside the two namespaces
SCHEDULER = f"tcp://{IP['a']}:8786"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"  # inside node A
BUCKET = "richpref"
DATA = f"s3://{BUCKET}/data"
ARGS = SMALL_ARGS  # 4 prompts, 2 shards, one voting reward (tests/run_sizes.py)
STAGES = [s.name for s in ALL_STAGES]
HOLD = "edit:0"  # the shard whose holder is killed
PRELOAD = "richpref.run.shard_task"


def _sh(*cmd: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=True, timeout=timeout, env=env)


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
    """PostgreSQL, an S3 server and the Dask scheduler on node a, one GPU worker per node. Every process
    is stopped by pid at the end."""
    base = Path(tempfile.mkdtemp(prefix="richpref-multinode-"))
    base.chmod(0o755)  # postgres (not root) must reach its folder below
    pg = base / "pg"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RICHPREF_TORCH_THREADS": "1",
           "OMP_NUM_THREADS": "1", "RICHPREF_LEASE_SECONDS": "5", "PREFECT_HOME": str(base / "prefect")}
    env.pop("PREFECT_API_URL", None)
    env.pop("RICHPREF_FAULTS", None)
    curate = [str(BIN / "richpref"), "--data-dir", DATA, "curate", "--models-root", str(tiny_models), *ARGS]
    procs: list[subprocess.Popen] = []
    logs = open(base / "servers.log", "w")
    s3 = None
    try:
        pg.mkdir()
        shutil.chown(pg, "postgres", "postgres")
        as_pg = ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups"]
        _sh(*as_pg, _pg_bin("initdb"), "-D", str(pg / "db"), "--auth=trust", "-U", "postgres", "--no-sync")
        procs.append(subprocess.Popen(_in("a", *as_pg, _pg_bin("postgres"), "-D", str(pg / "db"), "-k", str(pg),
                                          "-h", "127.0.0.1", "-p", "5432"), stdout=logs, stderr=logs))
        s3 = S3Server(base, host=IP["a"], port=9000, wrap=_in("a"))
        env.update(s3.env())  # the key and the endpoint, as a user exports them on every node
        _sh(*_in("a", sys.executable, "-c", f"import s3fs; s3fs.S3FileSystem().mkdir({BUCKET!r})"), env=env)
        _wait(lambda: _ok(_in("a", _pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", "5432")), "PostgreSQL", procs=procs)
        # --preload: the scheduler unpickles the task graph, and the workers run the preflight, on their
        # event loops; importing richpref (torch included) there first would stall them for many
        # seconds on a loaded machine (the docs' recipe does the same).
        procs.append(subprocess.Popen(_in("a", str(BIN / "dask"), "scheduler", "--host", IP["a"], "--port", "8786",
                                          "--no-dashboard", "--preload", PRELOAD), env=env, stdout=logs, stderr=logs))
        workers = {}
        for n in "ab":  # sleeps in the held shard, so a test can kill its holder mid-shard
            workers[n] = subprocess.Popen(
                _in(n, str(BIN / "dask"), "worker", SCHEDULER, "--host", IP[n], "--name", f"node-{n}", "--nthreads",
                    "3", "--resources", "GPU=1", "--no-nanny", "--no-dashboard", "--preload", PRELOAD),
                env={**env, "RICHPREF_FAULTS": f"{HOLD}:sleep-8"}, stdout=logs, stderr=logs)
            procs.append(workers[n])
        ready = ("from distributed import Client; c = Client('%s', timeout=300); c.wait_for_workers(2, timeout=300)"
                 % SCHEDULER)
        _sh(*_in("a", sys.executable, "-c", ready), timeout=330)
        yield {"base": base, "env": env, "curate": curate, "workers": workers, "procs": procs, "s3": s3}
    finally:
        _stop(procs)
        if s3 is not None:
            s3.stop()
            assert s3.proc.poll() is not None
        logs.close()
        shutil.copy(base / "servers.log", Path(tempfile.gettempdir()) / "richpref-multinode-servers.log")
        left = {n: subprocess.run(["ip", "netns", "pids", NS[n]], capture_output=True, text=True).stdout.split()
                for n in "ab"}
        for p in procs:
            assert p.poll() is not None
        shutil.rmtree(base, ignore_errors=True)
        assert left == {"a": [], "b": []}, f"processes left in the namespaces: {left}"


# Run on node a (this process cannot reach the S3 server): the run's pairs, work log and leftovers.
_READ_RUN = """
import hashlib, json, sys
from richpref.run.storage import RunStore
store = RunStore(sys.argv[1], sys.argv[2])
pairs = {s: hashlib.sha256(store.fs.cat_file(store.shard_path("pairs", s))).hexdigest() for s in store.shards("pairs")}
names = [st + "/" + n.rsplit("/", 1)[-1] for st in sys.argv[3:] for n in store.fs.ls(store.stage_dir(st), detail=False)]
print(json.dumps({"pairs": pairs, "work": [(r["stage"], r["shard"]) for r in store.read_log("work.jsonl")],
                  "claims": sorted(n.split(".commit-")[0] for n in names if ".commit-" in n),
                  "left": [n for n in names if ".tmp-" in n or ".lease-" in n]}))
"""


def _s3_run(env: dict, run: str) -> dict:
    done = _sh(*_in("a", sys.executable, "-c", _READ_RUN, DATA, run, *(s.out for s in ALL_STAGES)), env=env)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["pairs"] = {int(k): v for k, v in out["pairs"].items()}
    return out


def _lease_taker(s3: S3Server, path: str) -> str | None:
    """The node whose worker created the lease record at `path` (the S3 server logs each client)."""
    for client, req, status in s3.requests_from():
        if req.startswith(f"PUT /{BUCKET}/{path} ") and status == "200":
            return next(n for n, ip in IP.items() if ip == client)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(1500)  # two tiny curates and the servers' start, on a shared 2-core machine
def test_a_curate_over_two_nodes_on_s3_survives_a_killed_worker_and_equals_a_local_run(small_reference, cluster):
    env, s3 = cluster["env"], cluster["s3"]
    log = cluster["base"] / "curate.log"
    with open(log, "w") as sink:
        run = subprocess.Popen(_in("a", *cluster["curate"], "--run", "multi", "--dask-address", SCHEDULER,
                                   "--prefect-host", IP["a"]),
                               env={**env, "PREFECT_API_DATABASE_CONNECTION_URL": PG_URL},
                               stdout=sink, stderr=subprocess.STDOUT)
    stage, shard = HOLD.split(":")
    lease = f"data/runs/multi/{stage}/part-{int(shard):05d}.lease-0000"
    try:
        _wait(lambda: _lease_taker(s3, lease) is not None, f"a worker to hold {HOLD}", timeout=600, procs=[run])
        victim = _lease_taker(s3, lease)
        holder = cluster["workers"][victim].pid
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
    got = _s3_run(env, "multi")
    # Each shard committed exactly once: one commit claim each (the killed holder never committed its
    # held shard). The work log has at most one record a shard: the killed worker may also have had a
    # second shard in flight, committed and killed before its record was written.
    every = sorted((s, k) for s in STAGES for k in range(2))
    assert len(got["claims"]) == len(set(got["claims"])) == len(every), got["claims"]
    work = sorted(tuple(w) for w in got["work"])
    assert len(work) == len(set(work)) and set(work) <= set(every) and len(work) >= len(every) - 1, got["work"]
    assert got["left"] == []  # no temporary file, no lease left behind
    assert got["pairs"] == small_reference.pairs != {}
    # The flow ran against PostgreSQL: its flow run is recorded there.
    rows = subprocess.run(_in("a", _pg_bin("psql"), "-h", "127.0.0.1", "-U", "postgres", "-tAc",
                              "select count(*) from flow_run where name is not null"),
                          capture_output=True, text=True, check=True).stdout.strip()
    assert int(rows) >= 1
