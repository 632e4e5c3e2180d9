"""Runs on S3, against a real S3 server (moto, started once for the module on a free port): the CLI
curates to s3:// the same shards as to a local folder; of 32 processes asking for one shard's lease
exactly one gets it; a holder whose lease was taken over cannot commit; a wrong credential or an
unreachable endpoint fails in seconds, naming the data dir and the fix."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pyarrow as pa
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "richpref.cli.commands", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _env(s3, tiny_models, **extra):
    return {**os.environ, **s3.env(), "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "RICHPREF_TORCH_THREADS": "1",
            "RICHPREF_MODELS_ROOT": str(tiny_models), **extra}


def _shards(store, stages):
    """{stage/part: (sha256 of the Parquet bytes, manifest key)} of a run."""
    from richpref.run.runner import stage_manifests

    out = {}
    for st in stages:
        for s, m in stage_manifests(store, st).items():
            data = store.fs.cat_file(store.shard_path(st, s))
            assert hashlib.sha256(data).hexdigest() == m.sha256
            out[f"{st}/part-{s:05d}"] = (m.sha256, m.key)
    return out


def test_the_cli_curates_to_s3_the_same_shards_as_to_a_local_folder(s3, bucket, tiny_models, tmp_path,
                                                                     prefect_api_env, one_torch_thread):
    from richpref.ops.entrypoints import CURATE, load_flow
    from richpref.run.storage import RunStore

    # On the session's Prefect API: the CLI's own temporary server is not what this test is about.
    env = _env(s3, tiny_models, XDG_CACHE_HOME=str(tmp_path / "cache"), **prefect_api_env)
    # relabel.dtype: a key of the previous layout (now score.dtype), whose warning the CLI shows once
    overrides = ["source.limit=4", "source.shard_size=2", "relabel.dtype=float32"]
    url = f"s3://{bucket}/data"
    before = len(s3.requests())
    remote = _cli(["--data-dir", url, "curate", "--profile", "tiny", "--run", "r", "--until", "sample",
                   *(a for o in overrides for a in ("--set", o))], env)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert f"run folder: {url}/runs/r" in remote.stdout and "sample" in remote.stdout  # the summary read S3
    # A shard's own requests (its lease, claim, Parquet, manifest and work-log record; the summary's
    # manifest reads included): 13.5 a shard. Before, each write went through a temporary name and a
    # copy, a fresh shard's claim and manifest were read though not listed, and the lease was listed
    # again to release it: 24 (and 4 bucket checks a shard from "making" folders besides).
    shard_requests = [r for r in s3.requests()[before:]
                      if any(f"{bucket}{s}data/runs/r/{stage}/{name}" in r for s in ("/", "?list-type=2&prefix=")
                             for stage in ("source", "sample") for name in ("part-", "work.jsonl.d/"))]
    assert len(shard_requests) / 4 <= 16, "\n".join(shard_requests)
    assert remote.stderr.count("the command's --set uses keys of the previous layout (--set relabel.dtype is now score.dtype") == 1, remote.stderr[-3000:]
    # the same run on a local folder, in this process (one torch thread, as the CLI run had)
    load_flow(CURATE)(profile="tiny", run="r", data_dir=str(tmp_path / "local"), overrides=overrides,
                      models_root=str(tiny_models), until="sample")
    got = _shards(RunStore(url, "r"), ["source", "sample"])
    assert len(got) == 4
    assert got == _shards(RunStore(str(tmp_path / "local"), "r"), ["source", "sample"])
    names = RunStore(url, "r").fs.ls(f"{bucket}/data/runs/r/sample", detail=False)
    assert not [n for n in names if ".tmp-" in n or ".lease-" in n]  # nothing left half-done


def _race(url: str, start, asked, out) -> None:
    from richpref.run.leases import Lease, try_lease
    from richpref.run.storage import RunStore

    store = RunStore(url, "race")
    path = store.shard_path("sample", 0)
    store.fs.ls(store.root.split("/", 1)[0])  # connect before the start line
    start.wait()
    got = try_lease(store.fs, path, seconds=60)
    out.put(isinstance(got, Lease))
    asked.wait()  # the winner holds it until every process has asked
    if isinstance(got, Lease):
        got.release()


def test_of_32_processes_racing_for_one_lease_on_s3_exactly_one_wins(s3, bucket):
    ctx = mp.get_context("fork")  # fsspec starts its event loop afresh in a forked child
    out, start, asked = ctx.Queue(), ctx.Barrier(32), ctx.Barrier(32)
    url = f"s3://{bucket}/data"
    procs = [ctx.Process(target=_race, args=(url, start, asked, out)) for _ in range(32)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(results) == 1 and len(results) == 32


def _table(value: str) -> pa.Table:
    return pa.table({"item_id": ["a", "b"], "status": ["ok", "ok"], "reason": [None, None], "prompt": [value, value]},
                    schema=pa.schema([("item_id", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                                      ("prompt", pa.string())]))


def test_a_holder_whose_lease_was_taken_over_cannot_commit(s3, bucket, monkeypatch):
    from richpref.run.commit import LeaseLost
    from richpref.run.leases import Lease, try_lease
    from richpref.run.runner import manifest_path, stage_manifests, write_shard
    from richpref.run.storage import RunStore

    store = RunStore(f"s3://{bucket}/data", "r")
    path = store.shard_path("sample", 0)
    old = try_lease(store.fs, path, seconds=0.5)  # not entered: no renewal, so it expires
    assert isinstance(old, Lease)
    time.sleep(0.7)
    new = try_lease(store.fs, path, seconds=60)
    assert isinstance(new, Lease) and new.generation == old.generation + 1  # taken over
    with pytest.raises(LeaseLost):
        write_shard(store, "sample", 0, _table("old"), "k", lease=old)
    assert not store.fs.exists(manifest_path(store, "sample", 0)) and not store.fs.exists(path)
    mine = write_shard(store, "sample", 0, _table("new"), "k", lease=new)
    assert mine is not None
    # The old holder passes its check just before the takeover, and writes after the new holder's commit:
    # the conditional commit still refuses it.
    monkeypatch.setattr(Lease, "still_held", lambda self: True)
    assert write_shard(store, "sample", 0, _table("old"), "k", lease=old) is None
    after = stage_manifests(store, "sample")[0]
    assert after.sha256 == mine.sha256 == hashlib.sha256(store.fs.cat_file(path)).hexdigest()
    assert json.loads(store.fs.cat_file(manifest_path(store, "sample", 0)))["sha256"] == mine.sha256
    assert not [n for n in store.fs.ls(store.stage_dir("sample"), detail=False) if ".tmp-" in n]
    new.release()


@pytest.mark.parametrize("broken", ["secret", "endpoint"])
def test_a_wrong_credential_or_endpoint_fails_in_seconds_naming_the_data_dir_and_the_fix(s3, bucket, tiny_models,
                                                                                         tmp_path, broken):
    bad = {"AWS_SECRET_ACCESS_KEY": "not-the-secret"} if broken == "secret" else \
        {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    env = _env(s3, tiny_models, XDG_CACHE_HOME=str(tmp_path / "cache"), **bad)
    t0 = time.time()
    r = _cli(["--data-dir", f"s3://{bucket}/data", "curate", "--profile", "tiny", "--run", "r"], env, timeout=120)
    took = time.time() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"data dir s3://{bucket}/data" in r.stderr and "AWS_SECRET_ACCESS_KEY" in r.stderr
    assert "AWS_ENDPOINT_URL_S3" in r.stderr and "Traceback" not in r.stderr
    assert ("access denied" if broken == "secret" else "cannot be reached") in r.stderr
    assert took < 30, took  # the CLI's own start is most of it


def test_a_parquet_source_on_s3_is_read_by_row_group_and_gives_the_local_shards(s3, bucket, tmp_path):
    from test_source import _pickapic

    from richpref.common.objstore import url_to_fs
    from richpref.schemas.config import SourceConfig
    from richpref.sources import parquet as parquet_reader
    from richpref.tasks.source import check_source, open_view, shard_source

    local = tmp_path / "src" / "big.parquet"
    local.parent.mkdir()
    _pickapic(local, 200, row_group_size=10, label_of=lambda i: 1.0)
    fs, _ = url_to_fs(f"s3://{bucket}")
    fs.put_file(str(local), f"{bucket}/src/big.parquet")
    common = dict(kind="parquet", pickapic_preferred=True, offset=35, limit=20, shard_size=8)
    remote_cfg = SourceConfig(path=f"s3://{bucket}/src", **common)
    parquet_reader.ROW_GROUPS_READ.clear()
    assert check_source(remote_cfg) == 3
    view = open_view(remote_cfg)
    keys = [view.shard_key(k) for k in range(3)]
    assert parquet_reader.ROW_GROUPS_READ == []  # counting and keying decode no page (keys read text chunks, no images)
    remote = shard_source(remote_cfg)
    assert sorted(set(parquet_reader.ROW_GROUPS_READ)) == [("big.parquet", 3), ("big.parquet", 4), ("big.parquet", 5)]
    local_cfg = SourceConfig(path=str(local.parent), **common)
    assert [t.to_pylist() for t in remote] == [t.to_pylist() for t in shard_source(local_cfg)]
    assert len(set(keys)) == 3  # (the path is part of the key: not equal to the local file's keys)


def test_a_parquet_source_on_s3_is_read_with_one_version_check_and_footer_a_view(s3, bucket, tmp_path):
    """A shard asked the store for the file's version (a HEAD) each time it needed the footer, about nine
    times a shard, and fetched the footer again for each row group it read."""
    from test_source import _pickapic

    from richpref.common.objstore import url_to_fs
    from richpref.schemas.config import SourceConfig
    from richpref.tasks.source import shard_source

    local = tmp_path / "big.parquet"
    _pickapic(local, 400, row_group_size=50, label_of=lambda i: 1.0)
    fs, _ = url_to_fs(f"s3://{bucket}")
    fs.put_file(str(local), f"{bucket}/src/big.parquet")
    before = len(s3.requests())
    tables = shard_source(SourceConfig(kind="parquet", path=f"s3://{bucket}/src", pickapic_preferred=True, shard_size=8))
    asked = s3.requests()[before:]
    assert len(tables) == 50 and sum(t.num_rows for t in tables) == 400
    heads = [r for r in asked if r.startswith("HEAD")]
    reads = [r for r in asked if r.startswith("GET") and "big.parquet" in r]
    assert len(heads) < len(tables), heads  # the listing and version checks of a view, not ~9 a shard
    # 8 row groups, the footer once (its tail, then the rest), and the key's read of each group's caption
    # and label chunks (two reads: the images lie between them, and are not read to key)
    assert len(reads) <= 8 + 2 + 2 * 8, reads


def test_dedupe_digests_are_written_once_into_an_s3_run_folder_and_read_back_by_other_workers(s3, bucket, tmp_path):
    from test_dedupe import _dupes_source

    from richpref.sources import dedupe
    from richpref.sources import parquet as parquet_reader
    from richpref.run.storage import RunStore
    from richpref.tasks.source import compute_shard, shard_source

    cfg = _dupes_source(tmp_path)
    one = [r for t in shard_source(cfg) for r in t.to_pylist()]
    store = RunStore(f"s3://{bucket}/data", "r")
    scratch = store.scratch_dir("source")
    assert scratch.startswith(f"s3://{bucket}/data/runs/r/_scratch/source")
    dedupe._INDEXES.clear()
    got = {k: compute_shard(cfg, k, scratch).to_pylist() for k in range(7)}
    assert len(store.fs.ls(f"{bucket}/data/runs/r/_scratch/source")) == 7  # one digest per shard, written once
    # another worker, nothing in memory: it reads the 7 digests, not the earlier shards' image columns
    dedupe._INDEXES.clear()
    parquet_reader.ROW_GROUPS_READ.clear()
    parquet_reader._LAST_GROUP.clear()
    got[7] = compute_shard(cfg, 7, scratch).to_pylist()
    assert {rg for _, rg in parquet_reader.ROW_GROUPS_READ} == {5, 6}  # rows 35-39 only
    assert [r for k in range(8) for r in got[k]] == one


def test_training_pairs_on_s3_are_read_by_row_group_and_match_the_local_file(s3, bucket, tmp_path):
    import pyarrow.parquet as pq

    from richpref.common.objstore import url_to_fs
    from richpref.schemas.training import PairSourceConfig
    from richpref.training import remote_pairs
    from richpref.training.data import load_pair_source

    n = 40
    labels = [0.5 if i % 5 == 0 else float(i % 2) for i in range(n)]  # ties dropped
    table = pa.table({"caption": [f"c{i}" for i in range(n)], "jpg_0": [b"a%d" % i for i in range(n)],
                      "jpg_1": [b"b%d" % i for i in range(n)], "label_0": labels, "extra": list(range(n))})
    local = tmp_path / "pairs" / "part-00000.parquet"
    local.parent.mkdir()
    pq.write_table(table, local, row_group_size=8)
    fs, _ = url_to_fs(f"s3://{bucket}")
    fs.put_file(str(local), f"{bucket}/pairs/part-00000.parquet")
    want = load_pair_source(PairSourceConfig(path=str(local.parent)))
    remote_pairs.ROW_GROUPS_READ.clear()
    got = load_pair_source(PairSourceConfig(path=f"s3://{bucket}/pairs/"))
    assert len(got) == len(want) == 32 and got["label_0"] == want["label_0"]
    assert remote_pairs.ROW_GROUPS_READ == []  # counting and labels: footers and the label column only
    rows = [0, 1, 30, 31]
    assert got[rows] == {c: want[rows][c] for c in got.column_names}
    assert got.column_names == ["caption", "jpg_0", "jpg_1", "label_0"]
    assert sorted({g for _, g in remote_pairs.ROW_GROUPS_READ}) == [0, 4]  # the batch's row groups only


def test_a_run_folder_on_s3_given_as_pairs_or_as_a_source_names_its_pairs_folder(s3, bucket, tmp_path):
    import pyarrow.parquet as pq

    from richpref.common.objstore import url_to_fs
    from richpref.schemas.config import SourceConfig
    from richpref.sources import SourceError, source_files
    from richpref.training.data import DataError, pair_files

    fs, _ = url_to_fs(f"s3://{bucket}")
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "part-00000.parquet")
    for stage in ("check", "pairs"):
        fs.put_file(str(tmp_path / "part-00000.parquet"), f"{bucket}/runs/demo/{stage}/part-00000.parquet")
    fs.pipe_file(f"{bucket}/runs/demo/run.json", b"{}")
    run = f"s3://{bucket}/runs/demo"
    with pytest.raises(DataError, match=rf"^data source path '{run}/' is a run's folder: give its pairs, '{run}/pairs'$"):
        pair_files(run + "/")
    with pytest.raises(SourceError, match=rf"^source.path '{run}' is a run's folder: give its pairs, '{run}/pairs'$"):
        source_files(SourceConfig(kind="parquet", path=run))
    assert source_files(SourceConfig(kind="parquet", path=run + "/pairs"))[0] == [f"{run}/pairs/part-00000.parquet"]


def test_the_finetune_preflight_reads_s3_pairs_footers_for_edit_masks_and_refuses_an_empty_url(s3, bucket, tiny_models,
                                                                                                  tmp_path):
    import pyarrow.parquet as pq

    from richpref.common.objstore import url_to_fs
    from richpref.schemas.training import load_finetune_config
    from richpref.training.data import DataError
    from richpref.training.finetune import with_pairs
    from richpref.training.setup import preflight

    fs, _ = url_to_fs(f"s3://{bucket}")
    cols = {"caption": ["c"], "jpg_0": [b"a"], "jpg_1": [b"b"], "label_0": [0.0]}
    for name, extra in (("masked", {"edit_mask": pa.array([None], pa.binary())}), ("plain", {})):
        pq.write_table(pa.table({**cols, **extra}), tmp_path / f"{name}.parquet")
        fs.put_file(str(tmp_path / f"{name}.parquet"), f"{bucket}/{name}/part-00000.parquet")
    cfg = load_finetune_config("finetune-tiny-flux", ["loss_mask=edit_region"], models_root=str(tiny_models))
    assert preflight(with_pairs(cfg, f"s3://{bucket}/masked/")) == "flux"
    with pytest.raises(ValueError, match="has an 'edit_mask' column: there is no region to weight"):
        preflight(with_pairs(cfg, f"s3://{bucket}/plain/"))
    with pytest.raises(DataError, match="no .parquet files"):
        preflight(with_pairs(cfg, f"s3://{bucket}/nothing/"))
    # the command, with a refused credential: one error line naming the path, before Prefect starts
    bad = {**_env(s3, tiny_models), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    r = _cli(["--data-dir", str(tmp_path / "data"), "finetune", "--config", "finetune-tiny-flux",
              "--pairs", f"s3://{bucket}/masked/"], bad, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: data source path 's3://{bucket}/masked/' cannot be listed (PermissionError"), r.stderr
    assert "; set AWS_ACCESS_KEY_ID" in r.stderr


def test_a_worker_with_a_wrong_s3_credential_fails_the_preflight_in_seconds_naming_it(s3, bucket):
    from distributed import Client, LocalCluster

    from richpref.run.cluster import ClusterError, check_cluster

    url = f"s3://{bucket}/data"
    bad = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}  # the worker's own environment
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, env=bad,
                      preload=["richpref.run.shard_task"]) as cluster, Client(cluster) as client:
        worker = next(iter(client.scheduler_info(n_workers=-1)["workers"]))
        t0 = time.monotonic()
        with pytest.raises(ClusterError) as err:
            check_cluster(client, url, None, need_gpu=False)
        took = time.monotonic() - t0
    msg = str(err.value)
    assert f"({worker})" in msg and f"cannot read and write the data dir {url}" in msg, msg
    assert "AWS_SECRET_ACCESS_KEY" in msg and "AWS_ENDPOINT_URL_S3" in msg, msg
    assert took < 15, took


def test_a_plan_over_an_s3_source_asks_its_listing_and_file_versions_once_not_once_a_shard(s3, bucket, tmp_path):
    """Each shard's key looked at the source's files anew (to see a file changed since): on S3 a LIST
    and a HEAD a file, for every shard a plan, stage pass or pipelined pass keys."""
    import pyarrow.parquet as pq

    from richpref.common.objstore import url_to_fs
    from richpref.run.plan import plan_stages
    from richpref.run.storage import RunStore
    from richpref.schemas.config import Profile, SourceConfig
    from richpref.tasks.source import STAGE

    fs, _ = url_to_fs(f"s3://{bucket}")
    for f in range(4):
        pq.write_table(pa.table({"caption": [f"prompt {f} {i}" for i in range(30)]}), tmp_path / f"{f}.parquet",
                       row_group_size=10)
        for copy in ("a", "b"):  # one for each plan: a file's footer and keys are kept per process
            fs.put_file(str(tmp_path / f"{f}.parquet"), f"{bucket}/{copy}/{f}.parquet")
    asked = {}
    for copy, shard_size in (("a", 2), ("b", 1)):  # 60 shards, then 120
        profile = Profile(name="p", source=SourceConfig(kind="parquet", path=f"s3://{bucket}/{copy}",
                                                        prompt_column="caption", shard_size=shard_size))
        before = len(s3.requests())
        [plan] = plan_stages((STAGE,), profile, RunStore(str(tmp_path / "data"), "r"))
        assert len(plan.todo) == 120 // shard_size
        requests = s3.requests()[before:]
        asked[shard_size] = (sum(r.startswith("HEAD") for r in requests), sum("list-type" in r for r in requests))
    # the same whatever the shard count (before: 4 HEADs and a LIST more a shard: 331 HEADs at 60 shards)
    assert asked[1] == asked[2] and asked[2][0] <= 10 * 4, asked

