"""Session fixtures: offline env, an isolated Prefect, the tiny models built once, and the fixtures tests
in tests/ and tests/tasks/ share. Fixtures only the stage tests share: tests/tasks/conftest.py."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

# Before anything imports prefect/transformers: offline, quiet, and Prefect state in a throwaway home.
# Every temporary folder of the session, its subprocesses' included (served VLMs' logs, Dask's scratch,
# torch's elastic launcher, multiprocessing's sockets), goes under one root: removed when the session
# passes (`pytest_unconfigure`), kept for a look when it fails.
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="richpref-tests-"))
_SESSION_TMP.chmod(0o755)  # the multi-node test's PostgreSQL runs as its own user below it
(_SESSION_TMP / "tmp").mkdir(mode=0o755)
os.environ["TMPDIR"] = tempfile.tempdir = str(_SESSION_TMP / "tmp")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_SESSION_TMP / "prefect" / "storage")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("RICHPREF_FAULTS", None)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Tests mirror the packages in folders; a test may reuse another's helpers by module name
# (`from test_curate_flow import curate_run`), whichever folder either sits in.
import sys  # noqa: E402

for _folder in sorted(p for p in Path(__file__).parent.iterdir() if p.is_dir() and p.name not in ("data", "__pycache__")):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))


# `make test` runs two pytest-xdist workers with `--dist loadgroup`. Each test file is one group, as with
# `--dist loadfile` (module fixtures built once), except that the files asking for one of these costly
# session fixtures form one group: one worker builds it, instead of both (the reference run ~40 CPU s;
# the served Prefect with its worker ~30 s and its background polling; the small reference run ~25 s).
SHARED_SESSION_FIXTURES = {"finished_run": "finished-run", "prefect_server": "served", "small_reference": "served"}


def xdist_groups(files: dict[str, set[str]]) -> dict[str, str]:
    """Each test file's xdist group, from the fixtures its tests use (transitively)."""
    return {path: next((g for f, g in SHARED_SESSION_FIXTURES.items() if f in used), path)
            for path, used in files.items()}


def pytest_collection_modifyitems(config, items):
    files: dict[str, set[str]] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], set()).update(item.fixturenames)
    groups = xdist_groups(files)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid.split("::")[0]]))


def pytest_sessionfinish(session, exitstatus):
    if exitstatus != 0:
        print(f"\ntemporary files of this session kept in {_SESSION_TMP}", file=sys.stderr)
        _REMOVE_AT_EXIT.cancel()


def _remove_session_tmp() -> None:
    import shutil

    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


# At exit, after multiprocessing's own exit handlers (priority -100) have removed this process's
# folder in it. xdist workers' roots sit inside the controller's, which goes last.
from multiprocessing.util import Finalize  # noqa: E402

_REMOVE_AT_EXIT = Finalize(None, _remove_session_tmp, exitpriority=-200)


def pytest_collection_finish(session):
    """Everything collection imported (torch, transformers, diffusers, Prefect, the tests) lives for the
    whole session: move it out of the cyclic collector's reach. The runner calls gc.collect() whenever
    it releases a model (every stage of every curate run); with ~700k tracked objects each call costs
    ~0.4 s of CPU, after gc.freeze() almost nothing. Only garbage cycles made later are collected,
    as before; nothing a test creates is frozen."""
    import gc

    gc.collect()
    gc.freeze()


# distributed's Nanny writes its pre-spawn environment (MALLOC_TRIM_THRESHOLD_, OMP/MKL/OPENBLAS
# threads = 1) into the parent's os.environ; a test that starts a local Dask cluster would otherwise
# hand those to every later test's subprocesses (fewer threads: other float rounding).
_DASK_PRESPAWN = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


_PRESPAWN_BASELINE = {k: os.environ.get(k) for k in _DASK_PRESPAWN}  # before any test (or module fixture) ran


@pytest.fixture(autouse=True)
def _restore_dask_prespawn_env():
    # Back to the session's baseline, not to the values at this test's start: a module-scoped cluster
    # fixture has already written Dask's values by then.
    yield
    for k, v in _PRESPAWN_BASELINE.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    from filelock import FileLock

    from richpref.models.tiny import build_tiny_models

    # RICHPREF_TEST_MODELS: a folder kept between sessions (rebuilt only when the builders change).
    root = Path(os.environ.get("RICHPREF_TEST_MODELS") or _SESSION_TMP / "models")
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{root}.lock"):  # pytest-xdist workers share the folder: one builds, the others wait
        build_tiny_models(root)
    return root


@pytest.fixture(scope="session")
def paths(tiny_models):
    """The tiny models' folders by name (richpref.models.tiny.LAYOUT: `paths.sd15`, `paths.sdxl`, ...)
    and their root (`paths.root`)."""
    from richpref.models.tiny import LAYOUT

    return SimpleNamespace(**{k: Path(tiny_models) / v for k, v in LAYOUT.items()}, root=Path(tiny_models))


@pytest.fixture
def tiny_flux(tiny_models):
    """The tiny FLUX.1 [dev] loaded as the sampler loads it (for tuned weights put into it), closed after."""
    from richpref.models.generator import TextToImage

    flux = TextToImage.load(str(tiny_models / "flux"), device="cpu")
    yield flux
    flux.close()


@pytest.fixture
def release_resident():
    """After the test, release the resident image model (models.runtime.resident)."""
    from richpref.models.runtime import resident

    yield
    resident.release()  # the next test starts with no model loaded


@pytest.fixture(scope="session")
def mini_run(tiny_models, tmp_path_factory):
    """(data dir, store, profile) of the mini run "mini": shard 0 of every stage up to the filter written
    by hand, then score, relabel and export through the real stages (tests/relabel_helpers.py). Built
    once per session for the score, relabel and export stage tests and tests/scenarios/test_flip_rate.py."""
    from relabel_helpers import build_mini_run

    return build_mini_run(tiny_models, tmp_path_factory)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api_env(prefect_harness) -> dict:
    """PREFECT_API_URL of the session's harness, for a subprocess that runs flows: without it each such
    process starts a temporary Prefect server of its own (10+ s of CPU; under load it can time out)."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session", autouse=True)
def session_torch_threads() -> int:
    """torch's thread count as the session starts. Float sums on 1 and on 2 threads differ in the last
    bits, and a tiny random VLM turns that into other words: runs compared with one another must be
    computed on the same count, whichever module (one_torch_thread or not) first asks for them."""
    import torch

    return torch.get_num_threads()


@pytest.fixture(scope="session")
def finished_run(runs_dir, tiny_models, prefect_harness, session_torch_threads):
    """The reference tiny run "ref" (12 prompts, 3 shards), curated once per session on the session's
    torch thread count (the tests that recompute its stages and compare run on it)."""
    import torch

    from test_curate_flow import curate_run

    before = torch.get_num_threads()
    torch.set_num_threads(session_torch_threads)
    try:
        return curate_run(runs_dir, "ref", tiny_models)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, tiny_models):
    """A real Prefect server on loopback with work pools, the project's deployments and a process
    worker (`richpref serve`), shared by the tests that run flows in subprocesses."""
    from richpref.common.procs import free_port
    from richpref.ops import serve

    data = tmp_path_factory.mktemp("served")
    port = free_port()
    log = open(data / "server.log", "w")
    procs = serve.start(data_dir=str(data), port=port, log=log)
    env = serve.server_env(str(data), "127.0.0.1", port)
    env.pop("RICHPREF_FAULTS", None)
    yield {"data": data, "env": env, "models": tiny_models}
    serve.stop(procs)
    log.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server (tests/s3_server.py) for the module, its endpoint and key in the environment."""
    from s3fs import S3FileSystem
    from s3_server import S3Server

    # fsspec keeps one S3FileSystem per set of arguments, and the endpoint is not one of them (it comes
    # from the environment): an instance made for an earlier module's server would call a stopped one
    S3FileSystem.clear_instance_cache()
    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3):
    """A new, empty bucket on the module's S3 server."""
    import uuid

    name = f"b-{uuid.uuid4().hex[:10]}"
    s3.make_bucket(name)
    return name


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run as fast on one thread, and other load on a shared machine cannot stall them.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SmallReference:
    """The uninterrupted small run, computed in the background: `pairs` waits for it."""

    def __init__(self, proc, data: Path, run: str) -> None:
        self.proc, self.data, self.run, self._pairs = proc, data, run, None

    @property
    def pairs(self) -> dict[int, str]:
        """sha256 of each pairs shard of the finished run."""
        import hashlib

        from richpref.run.storage import RunStore

        if self._pairs is None:
            _, err = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, err[-3000:]
            store = RunStore(str(self.data), self.run)
            self._pairs = {s: hashlib.sha256(Path(store.shard_path("pairs", s)).read_bytes()).hexdigest()
                           for s in store.shards("pairs")}
            assert self._pairs
        return self._pairs


@pytest.fixture(scope="session")
def small_reference(prefect_server):
    """One uninterrupted `richpref curate` of the runner tests' small run (tests/run_sizes.py SMALL_ARGS) on
    one torch thread, against the served Prefect. Started once per session, in the background: the first
    test that asks for it goes on with its own processes meanwhile and reads `.pairs` (sha256 of each
    pairs shard) when it compares. The crash/resume, lease and multi-node tests compare with it."""
    import subprocess
    import sys

    from run_sizes import SMALL_ARGS

    data, run = prefect_server["data"], "uninterrupted"
    cmd = [str(Path(sys.executable).parent / "richpref"), "--data-dir", str(data), "curate", "--run", run,
           "--models-root", str(prefect_server["models"]), *SMALL_ARGS]
    proc = subprocess.Popen(cmd, env={**prefect_server["env"], "RICHPREF_TORCH_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield SmallReference(proc, data, run)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture
def no_store_credentials(monkeypatch):
    """No S3 credentials anywhere botocore looks (variables, files, instance metadata), no endpoint, and
    no s3fs instance an S3 test made with its server's endpoint and key. After: the instances made here
    (no credentials, cached by their options alone) go, and those of the S3 tests come back."""
    import s3fs

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cached = dict(s3fs.S3FileSystem._cache)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem._cache.update(cached)
