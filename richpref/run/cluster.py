"""Preflight of a Dask cluster before the first shard: every worker's resources, device, package
versions, its reach of the data dir and of the Prefect API. Each problem fails in seconds with the
worker's name and the fix, instead of a run that hangs (no `GPU` resource anywhere) or fails shard by
shard (a node that cannot see the data, a different torch).
"""
from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlparse

from richpref.run.gpu_claims import GPU_WORKER_THREADS

log = logging.getLogger("richpref")

PACKAGES = ("richpref", "torch", "diffusers", "transformers", "prefect")
PROBE_DIR = "_preflight"
GPU_FIX = ("start each GPU worker with the resource shards of model stages claim, one per GPU: "
           f"`dask worker tcp://SCHEDULER:8786 --nthreads {GPU_WORKER_THREADS} --resources GPU=1` "
           "(or `dask cuda worker tcp://SCHEDULER:8786 --resources GPU=1`)")


class ClusterError(RuntimeError):
    """The cluster cannot run this curate; the message names the worker(s) and the fix."""


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(url: str) -> str | None:
    """The host of an http:// or tcp:// address ("tcp://10.0.0.5:8786" -> "10.0.0.5")."""
    return urlparse(url if "://" in url else f"tcp://{url}").hostname


def check_scheduler(address: str, timeout_s: float = 5.0) -> None:
    """The Dask scheduler at `address` takes a TCP connection (seconds, before Prefect starts); else
    ClusterError naming it and the fix. Dask's own client waited 30 s, then raised a bare OSError."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        socket.create_connection((parsed.hostname, parsed.port or 8786), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(f"the Dask scheduler at {address} cannot be reached ({exc}); start it "
                           "(`dask scheduler`, docs/operations.md) or fix --dask-address") from exc


def refuse_loopback_api(api_url: str | None, dask_address: str | None) -> None:
    """A Prefect API on 127.0.0.1/localhost cannot be reached by workers on other nodes: refuse it
    (before any worker is asked) when the scheduler is not on this machine's loopback."""
    if not api_url or not dask_address or is_loopback(url_host(dask_address)) or not is_loopback(url_host(api_url)):
        return
    raise ClusterError(
        f"PREFECT_API_URL={api_url} is a loopback address, which the workers of the Dask cluster at "
        f"{dask_address} cannot reach. Fix: let richpref start its Prefect server on an address they reach "
        f"(`richpref curate --dask-address {dask_address} --prefect-host 0.0.0.0`, or this node's IP), or run "
        "one server for all nodes (`richpref serve --host 0.0.0.0`, or `prefect server start --host 0.0.0.0` "
        "on PostgreSQL) and export PREFECT_API_URL=http://THAT-HOST:4200/api.")


def reachable_address(toward: str) -> str:
    """This machine's address on the interface that routes to `toward` (no packet is sent)."""
    host = url_host(toward) or toward
    if is_loopback(host):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    from richpref.tasks import ALL_STAGES

    # Stage code versions: a worker on other stage code would compute other outputs under the same keys.
    out["stages"] = ",".join(f"{s.name}={s.version}" for s in ALL_STAGES)
    return out


def _device() -> str:
    try:
        import torch
    except ImportError:
        return "no torch"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda ({', '.join(names)}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
    return "cpu"


def probe_worker(data_dir: str, token: str, api_url: str | None, timeout: float = 5.0) -> dict:
    """Run on each worker (Client.run): what it is, and whether it reaches the run's storage and API.
    It reads the client's probe file (the same storage, not a node-local folder of the same name)
    and writes its own, which the client reads back."""
    from richpref.common.objstore import credentials_hint, protocol, quick_fs

    out: dict = {"host": socket.gethostname(), "device": _device(), "versions": versions(), "errors": []}
    try:
        fs, root = quick_fs(data_dir, timeout)  # an object store: one attempt, short timeouts
        base = f"{root.rstrip('/')}/{PROBE_DIR}/{token}"
        with fs.open(f"{base}/client", "rb") as f:
            if f.read() != token.encode():
                raise OSError("the client's probe file holds other bytes")
        mine = f"{base}/worker-{uuid.uuid4().hex}"
        with fs.open(mine, "wb") as f:
            f.write(token.encode())
        out["probe"] = mine
    except Exception as exc:  # noqa: BLE001 - reported with the worker's name
        fix = (f"give this worker the store's credentials and endpoint: {credentials_hint(data_dir)}"
               if protocol(data_dir) != "file" else
               "mount the same shared storage on every node (or use an object store URL), with the same path")
        out["errors"].append(f"cannot read and write the data dir {data_dir} ({type(exc).__name__}: {exc}); {fix}")
    if api_url:
        import httpx

        try:
            code = httpx.get(f"{api_url.rstrip('/')}/health", timeout=timeout).status_code
            if code != 200:
                raise OSError(f"HTTP {code}")
        except Exception as exc:  # noqa: BLE001
            out["errors"].append(f"cannot reach the Prefect API {api_url} ({type(exc).__name__}: {exc}); "
                                 "start the server on an address every node reaches (`--prefect-host`) "
                                 "and open its port between the nodes")
    return out


@dataclass
class WorkerReport:
    address: str
    name: str
    resources: dict
    host: str = ""
    device: str = ""
    versions: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.name} ({self.address}, host {self.host}): {self.device}, resources {self.resources or '{}'}"


def _workers(client, wait_s: float) -> dict[str, dict]:
    try:
        client.wait_for_workers(1, timeout=wait_s)
    except Exception as exc:  # noqa: BLE001 - distributed raises TimeoutError (or a wrapped one)
        raise ClusterError(f"no Dask worker joined the scheduler {client.scheduler.address} within {wait_s:.0f}s; "
                           f"start them first: {GPU_FIX}") from exc
    return dict(client.scheduler_info(n_workers=-1)["workers"])


def check_cluster(client, data_dir: str, api_url: str | None, *, need_gpu: bool = True, wait_s: float = 30.0,
                  timeout: float = 60.0) -> list[WorkerReport]:
    """Ask every worker of `client`'s cluster; raise ClusterError naming each worker that cannot take
    part (and why), or when no worker has the `GPU` resource model stages claim. Returns the reports."""
    import fsspec

    infos = _workers(client, wait_s)
    reports = {a: WorkerReport(a, str(i.get("name", a)), dict(i.get("resources") or {})) for a, i in infos.items()}
    if need_gpu and not any(r.resources.get("GPU", 0) >= 1 for r in reports.values()):
        names = ", ".join(f"{r.name} ({r.address}, resources {r.resources or '{}'})" for r in reports.values())
        raise ClusterError(f"no Dask worker has the GPU resource that model stages claim, so their shards would "
                           f"wait forever. Workers: {names}. Fix: {GPU_FIX}")
    token = uuid.uuid4().hex
    fs, root = fsspec.core.url_to_fs(data_dir)
    base = f"{root.rstrip('/')}/{PROBE_DIR}/{token}"
    fs.makedirs(base, exist_ok=True)
    with fs.open(f"{base}/client", "wb") as f:
        f.write(token.encode())
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        answers = pool.submit(client.run, probe_worker, data_dir, token, api_url, on_error="return").result(timeout)
    except concurrent.futures.TimeoutError as exc:
        raise ClusterError(f"the workers did not answer the preflight within {timeout:.0f}s "
                           f"({', '.join(r.name for r in reports.values())}); a worker is hung or its "
                           "storage blocks") from exc
    finally:
        pool.shutdown(wait=False)
    mine = versions()
    for addr, r in reports.items():
        ans = answers.get(addr)
        if ans is None:
            r.errors.append("did not answer (it left the cluster)")
            continue
        if isinstance(ans, BaseException):
            r.errors.append(f"preflight raised {type(ans).__name__}: {ans}")
            continue
        r.host, r.device, r.versions, r.errors = ans["host"], ans["device"], ans["versions"], list(ans["errors"])
        if ans.get("probe"):
            try:
                with fs.open(ans["probe"], "rb") as f:
                    if f.read() != token.encode():
                        raise OSError("other bytes")
            except OSError as exc:
                r.errors.append(f"wrote {ans['probe']} but this process cannot read it back ({exc}): the "
                                "nodes do not share the data dir")
        diff = {k: (v, mine.get(k)) for k, v in r.versions.items() if v != mine.get(k)}
        if diff:
            what = "; ".join(f"{k} {w} here {c}" for k, (w, c) in diff.items())
            r.errors.append(f"runs other versions than this process ({what}); install the same richpref and "
                            "packages on every node")
    fs.rm(base, recursive=True)
    bad = [r for r in reports.values() if r.errors]
    if bad:
        raise ClusterError("preflight failed:\n  " + "\n  ".join(f"worker {r.name} ({r.address}): {'; '.join(r.errors)}"
                                                              for r in bad))
    gpus = sum(1 for r in reports.values() if r.resources.get("GPU", 0) >= 1)
    log.info("preflight: %d worker(s), %d with a GPU slot\n  %s", len(reports), gpus,
             "\n  ".join(r.line() for r in reports.values()))
    _warn_few_threads(reports, infos)
    return list(reports.values())


def _warn_few_threads(reports: dict[str, WorkerReport], infos: dict[str, dict]) -> None:
    """With fewer threads than GPU_WORKER_THREADS, a GPU worker's model-free shards wait for its model shards."""
    few = [f"{r.name} ({infos[a].get('nthreads')})" for a, r in reports.items()
           if r.resources.get("GPU", 0) >= 1 and infos[a].get("nthreads", 0) < GPU_WORKER_THREADS]
    if few:
        log.warning("GPU worker(s) with fewer than %d threads: %s. The model shards of a GPU slot take them, "
                    "so model-free shards wait; start GPU workers with --nthreads %d", GPU_WORKER_THREADS,
                    ", ".join(few), GPU_WORKER_THREADS)


def gpu_wait_seconds() -> float:
    return float(os.environ.get("RICHPREF_GPU_WAIT_SECONDS", "120"))


class GpuWatch:
    """While model shards wait on a Dask cluster: fail once no worker has held the `GPU` resource for
    `grace` seconds (all GPU workers lost), rather than wait forever for a worker that may never come."""

    def __init__(self, client, grace: float | None = None):
        self.client, self.grace = client, gpu_wait_seconds() if grace is None else grace
        self.since: float | None = None

    def gpu_workers(self) -> list[str]:
        infos = self.client.scheduler_info(n_workers=-1)["workers"]
        return [a for a, i in infos.items() if (i.get("resources") or {}).get("GPU", 0) >= 1]

    def check(self) -> None:
        import time

        if self.gpu_workers():
            self.since = None
            return
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since >= self.grace:
            raise ClusterError(f"no Dask worker with the GPU resource has been in the cluster for {self.grace:.0f}s "
                               f"(RICHPREF_GPU_WAIT_SECONDS), so model shards cannot run. Start GPU workers "
                               f"({GPU_FIX}) and rerun the same command: finished shards are kept")


def wait_watched(futures: list, watch: GpuWatch | None, timeout: float, return_when: str = "ALL_COMPLETED") -> None:
    """One wait on Dask futures (of Prefect's client, made current here) up to `timeout`; when it times
    out, `watch` fails the run if no GPU worker is left, instead of waiting forever."""
    from distributed import wait

    try:
        with futures[0].client.as_current():  # Prefect's client is not Dask's default one
            wait(futures, timeout=timeout, return_when=return_when)
    except TimeoutError:
        if watch is not None:
            watch.check()
