"""The streamed source: cost of a few rows from a large Parquet, and time to the first committed shard.

    python bench/source_stream.py limit          # limit 64 from a 30,000-row (>= 400 MB) Pick-a-Pic Parquet vs a 300-row one
    python bench/source_stream.py first-shard    # first committed source shard: 1,000,000-row source vs 300-row

Files are Pick-a-Pic-format Parquet (caption, jpg_0, jpg_1, label_0, has_label, are_different) of
random JPEG bytes, written to a temp dir and deleted afterwards. Each case runs in a fresh process
(`child`, fresh Prefect home and caches: bench/harness.py), which reports its time for the source work
(imports excluded: the same in every case), the bytes it read meanwhile (read_mb: bytes Arrow read from the
Parquet file, counted by a file object the source's `open_parquet` is given in the child; rchar_mb:
/proc/self/io rchar of the source work, every read of the process, lazy imports included), its peak RSS and whether the `datasets` cache gained anything.
N repeats (--repeats, default 3), cases alternated; raw runs in bench/results/.
Headline: bytes read from the large file / bytes of the row groups that hold the rows read, plus
the footer (goal <= 1.2); large / small bytes and time ratios are derived figures. Of the bytes read,
key_mb are the ones the shard keys hash (the caption and label chunks of every row group the keyed
shards cover: first-shard keys every shard, as a run's plan does), and rows_read_over_needed the ratio
without them.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


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


def _rchar() -> int:
    """Bytes this process has passed through read()/pread() calls (/proc/self/io `rchar`): every
    file read, Arrow's native ones included, whether or not the page cache served it."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


class _CountingFile(io.RawIOBase):
    """A file that counts the bytes read through it (Arrow reads a Python file object by read/seek)."""

    total = 0

    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos, whence=0):
        return self._f.seek(pos, whence)

    def tell(self):
        return self._f.tell()

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        _CountingFile.total += n or 0
        return n

    def read(self, n=-1) -> bytes:
        data = self._f.read(n)
        _CountingFile.total += len(data)
        return data

    def close(self) -> None:
        self._f.close()
        super().close()


class _KeyFile(_CountingFile):
    """A file opened for the bytes a shard key hashes (`open_stored`): counted in the total, and apart."""

    keyed = 0

    def readinto(self, b) -> int:
        n = super().readinto(b)
        _KeyFile.keyed += n or 0
        return n

    def read(self, n=-1) -> bytes:
        data = super().read(n)
        _KeyFile.keyed += len(data)
        return data


def _count_parquet_reads() -> None:
    """Every Parquet file the source opens (to read rows, or the bytes its keys hash) is opened through
    a _CountingFile."""
    from richpref.sources import parquet

    real, real_bytes = parquet.open_parquet, parquet.open_stored

    def counted(path: str, size: int | None = None, **kw):
        if parquet.is_url(path):
            return real(path, size=size, **kw)
        return parquet.pq.ParquetFile(_CountingFile(path), **kw)

    parquet.open_parquet = counted
    parquet.open_stored = lambda path, size: real_bytes(path, size) if parquet.is_url(path) else _KeyFile(path)


def child(args) -> None:
    """One measured case, in its own process: prints a JSON line."""
    _count_parquet_reads()
    from richpref.schemas.config import SourceConfig
    from richpref.run.runner import content_key, run_shard
    from richpref.schemas.config import Profile
    from richpref.run.storage import RunStore
    from richpref.tasks import source

    cfg = SourceConfig(kind="parquet", path=args.path, pickapic_preferred=True, limit=args.limit, shard_size=args.shard_size)
    profile = Profile(name="bench", source=cfg)
    rchar0 = _rchar()
    t0 = time.perf_counter()
    if args.case == "limit":  # what a run does with the source: check it, key and compute every shard
        n = source.check_source(cfg)
        rows = 0
        for k in range(n):
            content_key(source.STAGE, profile, k, {})
            rows += source.compute_shard(cfg, k).num_rows
        assert rows == args.limit, rows
    else:  # check the source, count its shards, key every shard (as a run's plan does), compute and commit shard 0
        n = source.check_source(cfg)
        keys = [content_key(source.STAGE, profile, k, {}) for k in range(n)]
        store = RunStore(args.data, "bench")
        run_shard(source.STAGE, 0, {}, store, profile, keys[0])
    seconds = time.perf_counter() - t0
    read_bytes = _rchar() - rchar0
    cache = Path(os.environ["HF_DATASETS_CACHE"])
    cached = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0
    print(json.dumps({"seconds": seconds, "shards": n, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "datasets_cache_bytes": cached, "read_bytes": read_bytes,
                      "file_read_bytes": _CountingFile.total, "key_read_bytes": _KeyFile.keyed}))


def needed_mb(path: Path, rows: int) -> float:
    """MB of the row groups that hold rows [0, rows) of a Parquet file, plus its footer: what a
    reader of those rows cannot avoid reading."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata
    total, seen = md.serialized_size, 0
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        total += sum(rg.column(j).total_compressed_size for j in range(rg.num_columns))
        seen += rg.num_rows
        if seen >= rows:
            break
    return total / 1e6


def run_case(bench, path: Path, limit: int | None, what: str, shard_size: int, name: str, rep: int) -> dict:
    """One case in a fresh process with its own caches (the `datasets` cache included)."""
    root, env = bench.fresh(f"{name}{rep}")
    cmd = [sys.executable, __file__, "child", "--case", what, "--path", str(path), "--shard-size", str(shard_size),
           "--data", str(root / "data")] + (["--limit", str(limit)] if limit else [])
    r = harness.run_process(cmd, env, timeout=1800)
    assert r["rc"] == 0, r["stderr"][-3000:]
    result = json.loads(r["stdout"].strip().splitlines()[-1])
    result["process_seconds"] = r["wall_s"]
    shutil.rmtree(root, ignore_errors=True)
    return result


def compare(bench, cases: dict[str, tuple[Path, int | None]], what: str, shard_size: int) -> list[dict]:
    os.sync()  # the files just written are flushed before anything is timed
    return bench.alternate(list(cases), lambda name, rep: run_case(bench, *cases[name], what, shard_size, name, rep))


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
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=None, help="JPEG side in pixels (default 88: ~7.5 KB; first-shard 8)")
    args = p.parse_args()
    if args.what == "child":
        return child(args)
    bench = harness.Bench(f"source_stream_{args.what.replace('-', '_')}", args.repeats)
    tmp = bench.tmp
    try:
        small = tmp / "small.parquet"
        write_pickapic(small, 300, args.image_size or (88 if args.what == "limit" else 8), args.row_group_size)
        big = tmp / "big.parquet"
        rows = args.rows or (30_000 if args.what == "limit" else 1_000_000)
        t0 = time.perf_counter()
        size = write_pickapic(big, rows, args.image_size or (88 if args.what == "limit" else 8), args.row_group_size)
        print(f"large file: {rows} rows, {size / 1e6:.0f} MB, row groups of {args.row_group_size} "
              f"(written in {time.perf_counter() - t0:.0f}s); small file: 300 rows, {small.stat().st_size / 1e6:.1f} MB")
        limit = 64 if args.what == "limit" else None
        runs = compare(bench, {"large": (big, limit), "small": (small, limit)}, args.what, args.shard_size)
        rows_read = limit or args.shard_size
        need = {"large": needed_mb(big, rows_read), "small": needed_mb(small, rows_read)}
        for r in runs:
            r.update(rchar_mb=r.pop("read_bytes") / 1e6, read_mb=r.pop("file_read_bytes") / 1e6,
                     file_mb=(size if r["side"] == "large" else small.stat().st_size) / 1e6, needed_mb=need[r["side"]])
            r["read_over_needed"] = r["read_mb"] / r["needed_mb"]
            # of which the keys': the text and label chunks of every row group a key covers, hashed
            r["key_mb"] = r.pop("key_read_bytes") / 1e6
            r["rows_read_over_needed"] = (r["read_mb"] - r["key_mb"]) / r["needed_mb"]
        rat = harness.ratios(runs, ("large", "read_mb"), ("small", "read_mb"), "read_ratio")
        rat = [{**x, **y} for x, y in zip(rat, harness.ratios(runs, ("large", "seconds"), ("small", "seconds"), "time_ratio"))]
        s = harness.summarize(runs + rat)
        what = (f"bytes read from a {rows:,}-row {size / 1e6:.0f} MB file for limit 64"
                if args.what == "limit" else
                f"bytes read from a {rows:,}-row {size / 1e6:.0f} MB source to commit its first shard")
        what += (f" / bytes of the row groups holding those rows and the footer ({need['large']:.1f} MB; row groups of "
                 f"{args.row_group_size} rows); large / small-file (300 rows) bytes read and times are the derived figures")
        bench.write(harness.headline("large.read_over_needed", s["large.read_over_needed"]["median"], "x", "<= 1.2",
                                     note=what), runs=runs + rat)
    finally:
        bench.cleanup()

if __name__ == "__main__":
    main()
