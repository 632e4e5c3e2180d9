"""Object-store requests of a no-op `richpref curate --plan` (a finished run, nothing to do) over N shards.

The fake run: a prompt file of N lines with `source.shard_size: 1` (N shards), and for every stage a
tiny manifest carrying the key the plan expects beside an empty Parquet file, so the plan finds every
shard done. Requests are counted two ways:

- `--s3` (small N): against a real S3 server (moto, tests/s3_server.py), from its request log;
- otherwise: the run on a local folder behind a wrapper that counts each filesystem call as the S3
  requests it costs (a listing: one LIST per 1,000 keys; a read: one GET; exists/info: one HEAD; a
  write: one PUT). `--s3 --n 20` checks the wrapper's count against the server's own.

`--curate`: the requests of a whole tiny `richpref curate` (the CLI, every stage, on the tiny models)
into s3:// on the moto server, per committed shard: what the shard runner's leases, claims, commits
and input reads cost on an object store, plus the plan, the flow and the summary around them. With
`--latency-ms`, the server waits that long before each answer, as a remote store's round trip, and
the CLI's wall (`curate_s`) is what a user would feel of them.

On the harness (a fresh process; the counts are deterministic, so one repeat by default): raw figures
in bench/results/store_requests-<commit>.json (store_requests_s3 with --s3, store_requests_curate
with --curate).

    PYTHONPATH=$PWD .venv/bin/python bench/store_requests.py                 # N = 500 1000 2000 4000
    PYTHONPATH=$PWD .venv/bin/python bench/store_requests.py --s3 --n 20     # the same on moto
    PYTHONPATH=$PWD .venv/bin/python bench/store_requests.py --curate --models data/models/tiny
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402


class CountingFS:
    """A filesystem proxy that counts the S3 requests each call would make."""

    def __init__(self, fs) -> None:
        self.fs, self.counts = fs, Counter()
        self.protocol = fs.protocol

    def ls(self, path, detail=False, **kw):
        out = self.fs.ls(path, detail=detail, **kw)
        self.counts["LIST"] += max(1, math.ceil(len(out) / 1000))
        return out

    def find(self, path, prefix="", **kw):
        out = [p for p in self.fs.find(path, **kw) if p.rsplit("/", 1)[-1].startswith(prefix)]
        self.counts["LIST"] += max(1, math.ceil(len(out) / 1000))
        return out

    def cat_file(self, path, *a, max_concurrency=None, **kw):
        self.counts["GET"] += 1
        return self.fs.cat_file(path, *a, **kw)

    def exists(self, path, **kw):
        self.counts["HEAD"] += 1
        return self.fs.exists(path, **kw)

    def info(self, path, **kw):
        self.counts["HEAD"] += 1
        return self.fs.info(path, **kw)

    def pipe_file(self, path, data, **kw):
        self.counts["PUT"] += 1
        return self.fs.pipe_file(path, data, **kw)

    def __getattr__(self, name):  # anything else: counted by name, so it shows in the table
        self.counts[name] += 1
        return getattr(self.fs, name)


def fake_run(store, profile, stages) -> None:
    """Every stage's shards committed for the keys the plan computes, with empty Parquet files."""
    from richpref.run.runner import ShardManifest, content_key, manifest_path, stage_shards

    manifests: dict[str, dict[int, ShardManifest]] = {}
    files: dict[str, bytes] = {}
    for stage in stages:
        manifests[stage.out] = {}
        for s in stage_shards(stage, profile, manifests):
            key = content_key(stage, profile, s, {r: manifests[r][s] for r in stage.reads})
            m = ShardManifest(stage=stage.out, shard=s, uri="", key=key, rows=1, kept=1)
            manifests[stage.out][s] = m
            files[manifest_path(store, stage.out, s)] = json.dumps(m.to_dict()).encode()
            files[store.shard_path(stage.out, s)] = b""
    for out in {st.out for st in stages}:
        store.fs.makedirs(store.stage_dir(out), exist_ok=True)
    store.fs.pipe(files)


def plan_requests(n: int, data_dir: str, work: Path, s3=None) -> dict:
    from richpref.schemas.config import load_profile
    from richpref.run.plan import plan_stages
    from richpref.run.storage import RunStore
    from richpref.tasks import ALL_STAGES

    prompts = work / f"prompts-{n}.txt"
    prompts.write_text("".join(f"a photo of thing {i}\n" for i in range(n)))
    profile = load_profile("tiny", [f"source.path={prompts}", "source.shard_size=1", "source.limit=null"])
    run = f"plan-{n}"
    fake_run(RunStore(data_dir, run), profile, ALL_STAGES)
    store = RunStore(data_dir, run)
    before = len(s3.requests()) if s3 else 0
    if s3 is None:
        store.fs = CountingFS(store.fs)
    t0 = time.perf_counter()
    plans = plan_stages(ALL_STAGES, profile, store)
    seconds = time.perf_counter() - t0
    assert all(not p.todo and not p.blocked and len(p.done) == n for p in plans), "the fake run is not up to date"
    if s3 is not None:
        reqs = s3.requests()[before:]
        counts = Counter("LIST" if "list-type" in r else r.split(" ", 1)[0] for r in reqs)
    else:
        counts = store.fs.counts
    total = sum(counts.values())
    return {"shards": n, "stages": len(ALL_STAGES), "requests": total, "per_shard_stage": total / (n * len(ALL_STAGES)),
            "by_kind": dict(sorted(counts.items())), "plan_s": round(seconds, 2)}


def curate_requests(s3, models: str, items: int, shard_size: int) -> dict:
    """Requests of one tiny curate (all stages) into s3://bench/curate, by kind, and per committed shard."""
    from richpref.run.runner import stage_manifests
    from richpref.run.storage import RunStore
    from richpref.tasks import ALL_STAGES

    env = {**os.environ, **s3.env(), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RICHPREF_TORCH_THREADS": "1",
           "RICHPREF_MODELS_ROOT": models}
    before = len(s3.requests())
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "richpref.cli.commands", "--data-dir", "s3://bench/curate", "curate",
                           "--profile", "tiny", "--run", "r", "--set", f"source.limit={items}",
                           "--set", f"source.shard_size={shard_size}"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"curate failed:\n{done.stderr[-3000:]}")
    reqs = s3.requests()[before:]
    store = RunStore("s3://bench/curate", "r")
    shards = sum(len(stage_manifests(store, out)) for out in {st.out for st in ALL_STAGES})
    counts = Counter("LIST" if "list-type" in r else r.split(" ", 1)[0] for r in reqs)
    return {"shards": shards, "requests": len(reqs), "per_shard": len(reqs) / shards, "curate_s": round(seconds, 1),
            "by_kind": dict(sorted(counts.items()))}


def start_s3(work: Path, latency_ms: float = 0.0):
    """The moto server with bucket `bench`, its credentials in this process's environment."""
    from s3_server import S3Server

    s3 = S3Server(work, latency_ms=latency_ms)
    os.environ.update(s3.env())
    s3.make_bucket("bench")
    return s3


def child(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="store-requests-"))
    if args.curate:
        s3 = start_s3(work, args.latency_ms)
        try:
            row = curate_requests(s3, args.models, args.items, args.shard_size)
        finally:
            s3.stop()
        print(json.dumps(row), flush=True)
        out = {k: row[k] for k in ("shards", "requests", "per_shard", "curate_s")}
        out.update({f"by_kind.{k}": c for k, c in row["by_kind"].items()})
        harness.print_child("RESULT ", {"curate": out})
        return
    s3 = start_s3(work) if args.s3 else None
    try:
        rows = []
        for n in args.n:
            if s3 is not None:
                # the counting wrapper's figure for the same N, beside the server's own
                local = plan_requests(n, str(work / "local"), work)
                rows.append({**plan_requests(n, "s3://bench/data", work, s3), "wrapper_requests": local["requests"]})
            else:
                rows.append(plan_requests(n, str(work / "local"), work))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if s3 is not None:
            s3.stop()
    out = {}
    for r in rows:
        for k in ("requests", "per_shard_stage", "plan_s", "wrapper_requests"):
            if k in r:
                out[f"n{r['shards']}.{k}"] = r[k]
        for kind, c in r["by_kind"].items():
            out[f"n{r['shards']}.{kind}"] = c
    a, b = rows[0], rows[-1]
    out["growth_over_shards"] = (b["requests"] / a["requests"]) / (b["shards"] / a["shards"]) if len(rows) > 1 else 1.0
    out["max_per_shard_stage"] = max(r["per_shard_stage"] for r in rows)
    harness.print_child("RESULT ", {"plan": out})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    ap.add_argument("--s3", action="store_true", help="against a moto S3 server (slow to fill: keep N small)")
    ap.add_argument("--curate", action="store_true", help="a whole tiny curate into s3:// on moto (needs --models)")
    ap.add_argument("--models", default=str(REPO / "data" / "models" / "tiny"), help="the tiny models (--curate)")
    ap.add_argument("--items", type=int, default=8, help="source.limit of the --curate run")
    ap.add_argument("--shard-size", type=int, default=2, help="source.shard_size of the --curate run")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="the S3 server waits this long before each answer (--curate: a remote store's round trip)")
    args = harness.child_args(ap, repeats=1).parse_args()
    if args.child:
        return child(args)
    if args.curate:
        name = "store_requests_curate" + (f"_latency{args.latency_ms:g}ms" if args.latency_ms else "")
        # with a round trip per request, the CLI's wall is what a user feels of them; without, only the count
        metric, unit = ("curate.curate_s", "s") if args.latency_ms else ("curate.per_shard", "requests")
        return harness.run(name, args.repeats, ["curate"], metric, unit,
                           script=__file__, args=harness.child_argv(sys.argv[1:]),
                           note=f"object-store requests of a whole tiny `richpref curate` into s3:// on a moto server "
                                f"({args.items} items, shards of {args.shard_size}"
                                f"{f', {args.latency_ms:g} ms a request' if args.latency_ms else ''}), per committed "
                                f"shard of every stage; the plan, the flow's listings and the summary included; "
                                f"curate_s: the CLI's wall")
    harness.run("store_requests" + ("_s3" if args.s3 else ""), args.repeats, ["plan"], "plan.max_per_shard_stage",
                "requests", script=__file__, args=harness.child_argv(sys.argv[1:]),
                note=f"object-store requests of a no-op `curate --plan` per shard and stage, the largest "
                     f"over N = {', '.join(map(str, args.n))} shards ("
                     f"{'moto S3 server' if args.s3 else 'counting wrapper on a local folder'}); "
                     f"growth_over_shards = 1 is linear; counts are deterministic, so N = 1 by default")


if __name__ == "__main__":
    main()
