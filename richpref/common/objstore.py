"""Data dirs on object stores (s3://, gs://, ...): opening their filesystem, and checking in seconds
that one can be reached with the credentials at hand, before any work starts.

Credentials and endpoint come from the store's own environment variables (for S3: botocore's
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_REGION`, and
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for an S3-compatible server such as MinIO or Ceph).
"""
from __future__ import annotations

import os
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import fsspec

# Object stores: no folders, and an object appears whole when its upload completes. fsspec would cache
# their listings; several processes write one run folder, so a cached listing misses other processes'
# leases and manifests.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "hf": "huggingface_hub"}
S3_ENV_HINT = ("set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the credentials and "
               "AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) for an S3-compatible server other than AWS")


class DataDirError(RuntimeError):
    """The data dir cannot be used: unknown protocol, package missing, unreachable, or access denied."""


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def local_folder(data_dir: str, *parts: str, what: str) -> str:
    """`data_dir/parts...` for `what` writes only local files (trainer checkpoints, evaluation images, the
    rounds' table): a data dir that is a URL is refused, naming `what` and the fix, instead of becoming a
    local folder named after it (`s3:/bucket/...` under the working directory)."""
    if "://" in data_dir:
        raise DataDirError(f"{what} writes a local folder, and the data dir {data_dir} is not one: give a local or "
                           "shared-filesystem folder (--output-dir, or a --data-dir for this command)")
    return os.path.join(data_dir, *parts)


def state_dir(data_dir: str, name: str) -> str:
    """Where a data dir's local state lives (Prefect's home): `<data_dir>/<name>`, or for a data dir on an
    object store the user's cache folder (`$XDG_CACHE_HOME/richpref/<name without its dot>`)."""
    if "://" not in data_dir:
        return str(Path(data_dir).resolve() / name)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "richpref" / name.lstrip(".")
    home.mkdir(parents=True, exist_ok=True)
    return str(home)


def storage_options(url: str) -> dict:
    return {"use_listings_cache": False} if protocol(url) in OBJECT_STORES else {}


def protocols(fs) -> tuple[str, ...]:
    """The protocol names an fsspec filesystem answers to (s3fs: ("s3", "s3a"))."""
    return tuple(fs.protocol) if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)


def is_object_store(fs) -> bool:
    """Whether `fs` is an object store: a write there is one PUT that readers see whole or not at all
    (no temporary name and rename needed), and there are no folders to make."""
    return any(p in OBJECT_STORES for p in protocols(fs))


def ensure_folder(fs, path: str) -> None:
    """Make the folder `path` where folders exist. Not on an object store, where s3fs's makedirs would
    only ask whether the bucket exists (a request per call, several a shard)."""
    if not is_object_store(fs):
        fs.makedirs(path, exist_ok=True)


def url_to_fs(url: str, **extra):
    """(filesystem, path inside it) for `url`; a missing fsspec backend names the package to install."""
    try:
        return fsspec.core.url_to_fs(url, **storage_options(url), **extra)
    except ImportError as exc:
        pkg = _PACKAGES.get(protocol(url), f"the fsspec backend for {protocol(url)}://")
        raise DataDirError(f"{url}: reading {protocol(url)}:// needs {pkg} (pip install {pkg}); {exc}") from exc
    except ValueError as exc:
        raise DataDirError(f"{url}: {exc}") from exc


def quick_fs(url: str, timeout_s: float = 5.0):
    """(filesystem, path) for a check that must answer in seconds: a fresh instance and, on S3, one
    attempt with short timeouts (a wrong endpoint must not spend minutes in retries)."""
    extra: dict = {"skip_instance_cache": True}  # a fresh instance: its one attempt is not the run's setting
    s3 = protocol(url) in ("s3", "s3a")
    if s3:
        extra.update(config_kwargs={"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                    "retries": {"total_max_attempts": 1, "mode": "standard"}})
    fs, path = url_to_fs(url, **extra)
    if s3:  # s3fs retries timeouts itself too (5 tries, a class setting): a hung endpoint took 15 s at 1 s
        fs.retries = 1
    return fs, path


def credentials_hint(url: str) -> str:
    """Where the credentials and endpoint of `url`'s store come from."""
    proto = protocol(url)
    return S3_ENV_HINT if proto in ("s3", "s3a") else f"check the {proto}:// credentials and endpoint"


def cannot_list(url: str, exc: BaseException) -> str:
    """The tail of an error for a store URL that could not be listed: any failure (s3fs's OSErrors,
    botocore's NoCredentialsError and EndpointConnectionError, which are not), and where the fix lies."""
    return f"cannot be listed ({type(exc).__name__}: {exc}); {credentials_hint(url)}"


def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming `url` and the fix, when the store behind `url` cannot be listed (wrong
    credentials, unreachable endpoint, no such bucket). Local paths: nothing to check."""
    if protocol(url) == "file":
        return
    fs, root = quick_fs(url, timeout_s)
    bucket = root.split("/", 1)[0]
    hint = credentials_hint(url)
    try:
        fs.ls(bucket, detail=False)
    except FileNotFoundError as exc:
        raise DataDirError(f"data dir {url}: bucket {bucket!r} does not exist (create it, or fix --data-dir); "
                           f"{type(exc).__name__}: {exc}") from exc
    except PermissionError as exc:
        raise DataDirError(f"data dir {url}: access denied ({exc}); {hint}") from exc
    except Exception as exc:  # noqa: BLE001 - every other failure: unreachable endpoint, bad signature, ...
        raise DataDirError(f"data dir {url} cannot be reached: {type(exc).__name__}: {exc}; {hint}") from exc


def list_names(fs, folder: str, prefix: str = "") -> list[str]:
    """Names of the files in `folder` that start with `prefix`: on S3 one listing of just those keys
    (a server-side prefix), elsewhere the folder's listing filtered. FileNotFoundError if no folder."""
    if prefix and "s3" in protocols(fs):
        names = [p.rsplit("/", 1)[-1] for p in fs.find(folder, prefix=prefix)]
    else:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    return [n for n in names if n.startswith(prefix)]


def cat_small(fs, path: str) -> bytes:
    """A whole file's bytes in one request: s3fs otherwise asks for the size first (a HEAD per read)
    to split large reads. For manifests, leases and claims (a few hundred bytes) and whole input
    shards, which are read entire anyway."""
    if "s3" in protocols(fs):
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


READ_THREADS = 16  # small files (manifests, lease records) read at once from an object store


def read_many(fs, paths: list[str]) -> dict[str, bytes | None]:
    """The bytes of small files, read concurrently (None for a file that is gone)."""
    def one(path: str) -> bytes | None:
        try:
            return cat_small(fs, path)
        except FileNotFoundError:
            return None

    if len(paths) <= 1:
        return {p: one(p) for p in paths}
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(paths))) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def read_parquet(f, columns: list[str] | None = None):
    """A Parquet file's table (or those `columns`), from an open file object or an Arrow buffer, read
    on the calling thread. pyarrow reads a Python file object from its own threads otherwise (the dataset
    scanner of `read_table`; `ParquetFile`'s pre-buffering, on by default, on its I/O pool), and such a
    thread left at exit aborted the interpreter (`terminate called without an active exception`,
    SIGABRT): one process in five to eight through `read_table`, a few in a hundred under load through
    pre-buffering (`richpref summary`, a curate of a finished run). A run's shards are small: one thread
    decodes them at no loss worth a thread pool."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(f, pre_buffer=False).read(columns=columns, use_threads=False)
