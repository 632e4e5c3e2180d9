"""Reading a run's Parquet shards (richpref/common/objstore.py read_parquet, through RunStore); the data
dir check against an endpoint that never answers; on a real S3 server (moto, the `s3` fixture), listings
that see other clients' writes and small files read in one request."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from richpref.common.objstore import DataDirError, cat_small, check_reachable, list_names, read_many, read_parquet

READ_ALL = """
import sys
from richpref.run.storage import RunStore
store = RunStore(sys.argv[1], "r")
print(sum(store.read_shard("relabel", s, ["status", "flipped"]).num_rows for s in range(32)))
"""


def _shards(data: Path) -> None:
    folder = data / "runs" / "r" / "relabel"
    folder.mkdir(parents=True)
    for s in range(32):
        pq.write_table(pa.table({"status": ["ok"] * 32, "flipped": [True, False] * 16, "image": [b"x" * 1000] * 32}),
                       folder / f"part-{s:05d}.parquet")


def test_a_process_that_read_a_runs_shards_exits_cleanly(tmp_path):
    """Read through pyarrow's dataset scanner (`pq.read_table` on a file object), a process aborted at
    its exit, `terminate called without an active exception`, in about one run in five here: a
    thread the scanner left behind. Thirty processes, two at a time: all exit 0."""
    _shards(tmp_path)
    repo = str(Path(__file__).resolve().parents[2])

    def one(_):
        return subprocess.run([sys.executable, "-c", READ_ALL, str(tmp_path)], capture_output=True, text=True,
                              timeout=120, cwd=repo)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(one, range(30)))
    failed = [(r.returncode, r.stderr[-300:]) for r in runs if r.returncode != 0 or r.stdout.strip() != "1024"]
    assert not failed, failed


THREADS_AFTER_READING = """
import os, sys
from richpref.run.storage import RunStore
store = RunStore(sys.argv[1], "r")
before = len(os.listdir("/proc/self/task"))  # pyarrow's own, from its import (jemalloc's among them)
for s in range(32):
    store.read_shard("relabel", s, ["status", "flipped"])
    store.read_shard("relabel", s)
print(len(os.listdir("/proc/self/task")) - before)
"""


def test_reading_a_runs_shards_starts_no_thread_that_could_be_left_at_exit(tmp_path):
    # before, pre-buffering read the file from pyarrow's I/O pool (a thread per read, up to 8): the
    # threads the exit abort above needs; now none is started, so its rare aborts have no cause left
    _shards(tmp_path)
    repo = str(Path(__file__).resolve().parents[2])
    r = subprocess.run([sys.executable, "-c", THREADS_AFTER_READING, str(tmp_path)], capture_output=True, text=True,
                       timeout=120, cwd=repo, check=True)
    assert r.stdout.strip() == "0", r.stdout


def test_read_parquet_gives_the_table_and_the_columns_asked_for(tmp_path):
    _shards(tmp_path)
    path = tmp_path / "runs" / "r" / "relabel" / "part-00003.parquet"
    with open(path, "rb") as f:
        assert read_parquet(f).equals(pq.read_table(path))
    with open(path, "rb") as f:
        assert read_parquet(f, ["flipped"]).equals(pq.read_table(path, columns=["flipped"]))
    assert read_parquet(pa.BufferReader(path.read_bytes()), ["status"]).column_names == ["status"]


def test_an_s3_endpoint_that_never_answers_is_asked_once_and_fails_in_its_timeout(monkeypatch):
    # before: 10 requests, 15 s at a 1 s timeout (botocore's max_attempts counts retries, and s3fs
    # retries a timeout 5 times on its own), about a minute at the default 5 s
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])  # kept open, never answered
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    t0 = time.monotonic()
    try:
        with pytest.raises(DataDirError, match=r"data dir s3://bucket/data cannot be reached: ReadTimeoutError"):
            check_reachable("s3://bucket/data", timeout_s=1.0)
    finally:
        listener.close()
        for c in held:
            c.close()
    assert len(held) == 1
    assert time.monotonic() - t0 < 10


def test_a_run_store_on_s3_lists_what_another_process_wrote_after_its_first_listing(s3, bucket):
    # fsspec keeps an s3fs listing unless told not to: a worker would miss another's leases and manifests
    import fsspec

    from richpref.run.storage import RunStore

    store = RunStore(f"s3://{bucket}/data", "r")
    other = fsspec.filesystem("s3", skip_instance_cache=True)  # another process's own client
    other.pipe(f"{bucket}/data/runs/r/sample/a.json", b"{}")
    assert list_names(store.fs, f"{bucket}/data/runs/r/sample") == ["a.json"]
    other.pipe(f"{bucket}/data/runs/r/sample/b.json", b"{}")
    assert list_names(store.fs, f"{bucket}/data/runs/r/sample") == ["a.json", "b.json"]


def test_small_files_on_s3_are_read_in_one_get_each_without_asking_their_size(s3, bucket):
    # s3fs asks for an object's size (a HEAD) before a read it may split, unless told to read it whole
    from richpref.run.storage import RunStore

    store = RunStore(f"s3://{bucket}/data", "r")
    paths = [f"{bucket}/data/runs/r/sample/{k}.json" for k in range(3)]
    for k, path in enumerate(paths):
        store.fs.pipe(path, b"%d" % k)
    before = len(s3.requests())
    assert cat_small(store.fs, paths[0]) == b"0"
    assert read_many(store.fs, [*paths[1:], f"{bucket}/data/runs/r/sample/gone.json"]) == {
        paths[1]: b"1", paths[2]: b"2", f"{bucket}/data/runs/r/sample/gone.json": None}
    asked = s3.requests()[before:]
    assert len(asked) == 4 and all(r.startswith("GET ") for r in asked), asked
