"""The streamed source: cost of a few rows from a large Parquet, and time to the first committed shard.

    python bench/source_stream.py limit          # limit 64 from a 30,000-row (>= 400 MB) Pick-a-Pic Parquet vs a 300-row one
    python bench/source_stream.py first-shard    # first committed source shard: 1,000,000-row source vs 300-row

Files are Pick-a-Pic-format Parquet (caption, jpg_0, jpg_1, label_0, has_label, are_different) of
random JPEG bytes, written to a temp dir and deleted afterwards. Each case runs in a fresh process
(`child`), which reports its time for the source work (imports excluded: the same in every case),
its peak RSS and whether the `datasets` cache gained anything. Best of 3, cases interleaved.
Goals (issue 13): limit time and peak RSS ratios <= 1.2, no cache copy; first shard ratio <= 2.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _jpegs(n: int, size: int, seed: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_pickapic(path: Path, rows: int, image_size: int, row_group_size: int) -> int:
    """Pick-a-Pic-format rows; every image distinct (a shared pool of JPEGs, each with its own bytes
    after the end-of-image marker, which decoders ignore). Returns the file size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pool = _jpegs(512, image_size, seed=rows)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("has_label", pa.bool_()), ("are_different", pa.bool_())])
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, row_group_size):
            idx = range(start, min(rows, start + row_group_size))
            w.write_table(pa.table({
                "caption": [f"a photo of thing {i % 5000} number {i}" for i in idx],
                "jpg_0": [pool[i % 512] + i.to_bytes(8, "little") for i in idx],
                "jpg_1": [pool[(i * 7 + 3) % 512] + (i + 1 << 32).to_bytes(8, "little") for i in idx],
                "label_0": [float(i % 2) for i in idx],
                "has_label": [True] * len(idx),
                "are_different": [True] * len(idx),
            }, schema=schema), row_group_size=row_group_size)
    return path.stat().st_size


def child(args) -> None:
    """One measured case, in its own process: prints a JSON line."""
    from richpref.schemas.config import SourceConfig
    from richpref.runner import content_key, run_shard
    from richpref.schemas.config import Profile
    from richpref.storage import RunStore
    from richpref.tasks import source

    cfg = SourceConfig(kind="parquet", path=args.path, pickapic_preferred=True, limit=args.limit, shard_size=args.shard_size)
    profile = Profile(name="bench", source=cfg)
    t0 = time.perf_counter()
    if args.case == "limit":  # what a run does with the source: check it, key and compute every shard
        n = source.check_source(cfg)
        rows = 0
        for k in range(n):
            content_key(source.STAGE, profile, k, {})
            rows += source.compute_shard(cfg, k).num_rows
        assert rows == args.limit, rows
    else:  # check the source, count its shards, then key, compute and commit shard 0
        n = source.check_source(cfg)
        store = RunStore(args.data, "bench")
        run_shard(source.STAGE, 0, {}, store, profile, content_key(source.STAGE, profile, 0, {}))
    seconds = time.perf_counter() - t0
    cache = Path(os.environ["HF_DATASETS_CACHE"])
    cached = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0
    print(json.dumps({"seconds": seconds, "shards": n, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "datasets_cache_bytes": cached}))


def run_case(path: Path, what: str, limit: int | None, shard_size: int, tmp: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp / "datasets-cache"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    data = tempfile.mkdtemp(dir=tmp)
    cmd = [sys.executable, __file__, "child", "--case", what, "--path", str(path), "--shard-size", str(shard_size),
           "--data", data] + (["--limit", str(limit)] if limit else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    shutil.rmtree(data)
    return result


def compare(cases: dict[str, tuple[Path, int | None]], what: str, shard_size: int, tmp: Path, repeats: int = 3) -> dict:
    os.sync()  # the files just written are flushed before anything is timed
    best: dict[str, dict] = {}
    for i in range(repeats):
        for name, (path, limit) in (cases.items() if i % 2 == 0 else reversed(cases.items())):
            r = run_case(path, what, limit, shard_size, tmp)
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = {**r, "peak_rss_mib": min(r["peak_rss_mib"], best.get(name, r)["peak_rss_mib"])}
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["limit", "first-shard", "child"])
    p.add_argument("--case", choices=["limit", "first-shard"], help="(child) what to measure")
    p.add_argument("--path")
    p.add_argument("--limit", type=int)
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--data")
    p.add_argument("--rows", type=int, default=None, help="rows of the large file (default 30,000 / 1,000,000)")
    p.add_argument("--row-group-size", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=None, help="JPEG side in pixels (default 88: ~7.5 KB; first-shard 8)")
    args = p.parse_args()
    if args.what == "child":
        return child(args)
    tmp = Path(tempfile.mkdtemp(prefix="richpref-bench-source-"))
    try:
        small = tmp / "small.parquet"
        write_pickapic(small, 300, args.image_size or (88 if args.what == "limit" else 8), args.row_group_size)
        big = tmp / "big.parquet"
        if args.what == "limit":
            rows = args.rows or 30_000
            t0 = time.perf_counter()
            size = write_pickapic(big, rows, args.image_size or 88, args.row_group_size)
            print(f"large file: {rows} rows, {size / 1e6:.0f} MB, row groups of {args.row_group_size} "
                  f"(written in {time.perf_counter() - t0:.0f}s); small file: 300 rows, {small.stat().st_size / 1e6:.1f} MB")
            best = compare({"large": (big, 64), "small": (small, 64)}, "limit", args.shard_size, tmp)
        else:
            rows = args.rows or 1_000_000
            t0 = time.perf_counter()
            size = write_pickapic(big, rows, args.image_size or 8, args.row_group_size)
            print(f"large source: {rows} rows, {size / 1e6:.0f} MB, row groups of {args.row_group_size} "
                  f"(written in {time.perf_counter() - t0:.0f}s); small source: 300 rows")
            best = compare({"large": (big, None), "small": (small, None)}, "first-shard", args.shard_size, tmp)
        for name, r in best.items():
            print(f"{name}: {r['seconds']:.3f}s source work ({r['process_seconds']:.2f}s process), "
                  f"{r['shards']} shards, peak RSS {r['peak_rss_mib']:.0f} MiB, datasets cache {r['datasets_cache_bytes']} bytes")
        print(f"time ratio large/small: {best['large']['seconds'] / best['small']['seconds']:.2f}")
        print(f"peak RSS ratio large/small: {best['large']['peak_rss_mib'] / best['small']['peak_rss_mib']:.2f}")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
