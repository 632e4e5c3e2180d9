"""`richpref export RUN --format F --out DIR`: a run's pairs in the layout another trainer reads.

Only committed `pairs/` shards are read (a manifest beside its Parquet file, as `status` and the
runner count them; runner.stage_manifests), and a shard whose bytes are not the ones its manifest
recorded is left out and reported. Each pair the format cannot hold is reported with its reason and
counted, never dropped silently. `DIR/richpref-export.json` records the format, the shards read, the
counts, every skipped pair and every file written; a rerun into the same folder rewrites nothing that
is unchanged and removes the files of the previous export that this one no longer writes.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from richpref.exports.formats import FORMATS, WRITERS, Pair
from richpref.run.runner import stage_manifests
from richpref.run.storage import RunStore
from richpref.common.atomic import write_atomic

MANIFEST = "richpref-export.json"
SAFE = re.compile(r"[^A-Za-z0-9._-]")


class ExportError(ValueError):
    """An export that cannot start; the message names the run or folder and the fix."""


def safe_name(item_id: str) -> str:
    """A file name from an item id: kept as is when it is a plain name, else cleaned and hashed."""
    clean = SAFE.sub("_", item_id).strip(".") or "item"
    if clean == item_id:
        return clean
    return f"{clean[:80]}-{hashlib.sha256(item_id.encode()).hexdigest()[:8]}"


def _side(c) -> str:
    return "orig" if c is None or c < 0 else f"e{c}"


def pair_names(tables: dict[int, dict[str, list]]) -> dict[tuple[int, int], str]:
    """(shard, row) -> file stem. The item id alone when the item has one pair in the export, else the
    item id and the pair's two candidates (several pairs per item)."""
    count = Counter(i for cols in tables.values() for i in cols["item_id"])
    names: dict[tuple[int, int], str] = {}
    for shard, cols in tables.items():
        for k, item in enumerate(cols["item_id"]):
            name = safe_name(item)
            if count[item] > 1:
                c0 = cols["candidate_0"][k] if "candidate_0" in cols else None
                c1 = cols["candidate_1"][k] if "candidate_1" in cols else k
                name = f"{name}__{_side(c0)}_{_side(c1)}"
            names[(shard, k)] = name
    taken = Counter(names.values())
    for (shard, k), name in names.items():  # still the same name (a rerun of one pair): shard and row decide
        if taken[name] > 1:
            names[(shard, k)] = f"{name}__s{shard}r{k}"
    return names


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, data)


def _previous(out: Path, fmt: str) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    if old.get("format") != fmt:
        raise ExportError(f"{out} holds a {old.get('format')!r} export (see {path}); export {fmt!r} into another --out folder")
    return old


def export_run(data_dir: str, run: str, fmt: str, out: str | Path) -> dict:
    """Write run `run`'s committed pairs into `out` in format `fmt`; return the manifest written."""
    if fmt not in WRITERS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    store = RunStore(data_dir, run)
    out = Path(out)
    old = _previous(out, fmt)
    manifests = stage_manifests(store, "pairs")
    if not manifests:
        raise ExportError(f"run {run!r} has no committed pairs shards under {store.uri(store.stage_dir('pairs'))}; "
                          f"run `richpref curate --run {run}` to its end first")
    if not any(m.kept for m in manifests.values()):  # an empty dataset would fail in the trainer, not here
        raise ExportError(f"run {run!r} kept no pairs (its {len(manifests)} pairs shard(s) hold 0 rows): nothing to "
                          f"export; `richpref summary {run}` shows why its rows were rejected")
    shards, bad_shards = [], []
    for shard, m in sorted(manifests.items()):
        path = store.shard_path("pairs", shard)
        if m.sha256 and _sha256(store.fs, path) != m.sha256:
            bad_shards.append({"shard": shard, "reason": "not_committed: the file is not the one its manifest recorded "
                                                           "(a recompute did not finish); rerun curate"})
        else:
            shards.append((shard, m))
    light = {}
    for shard, _m in shards:
        with store.fs.open(store.shard_path("pairs", shard), "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in ("item_id", "candidate_0", "candidate_1") if c in pf.schema_arrow.names]
            light[shard] = pf.read(columns=cols).to_pydict()
    names = pair_names(light)

    writer = WRITERS[fmt](out=out, run=run)
    written, skipped = 0, []
    for shard, _m in shards:
        with store.fs.open(store.shard_path("pairs", shard), "rb") as f:
            pf = pq.ParquetFile(f)
            writer.begin_shard(shard, pf.schema_arrow)
            k = 0
            for batch in pf.iter_batches(batch_size=32):
                for row in batch.to_pylist():
                    pair = Pair(names[(shard, k)], row)
                    reason = writer.holds(pair)
                    if reason:
                        skipped.append({"item_id": row.get("item_id"), "shard": shard, "row": k, "reason": reason})
                    else:
                        writer.add(pair)
                        written += 1
                    k += 1
            writer.end_shard(shard)
    extra = writer.finish()

    keep = set(writer.files) | {MANIFEST}
    root = out.resolve()
    for rel in old.get("files", []):
        path = (out / rel).resolve()
        if rel not in keep and path.is_file() and root in path.parents:
            path.unlink()
    manifest = {
        "format": fmt, "layout_doc": writer.doc, "run": run, "data_dir": str(data_dir),
        "shards": [{"shard": s, "key": m.key, "rows": m.rows, "sha256": m.sha256} for s, m in shards],
        "shards_skipped": bad_shards, "written": written,
        "skipped": dict(sorted(Counter(s["reason"].split(":", 1)[0] for s in skipped).items())),
        "skipped_pairs": skipped, **extra, "files": sorted(set(writer.files)),
    }
    _write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())
    return manifest


def format_result(m: dict, out: str | Path, show: int = 20) -> str:
    lines = [f"exported {m['written']} pair(s) of run {m['run']} as {m['format']} into {out} (layout: {m['layout_doc']})"]
    n = len(m["skipped_pairs"])
    if n:
        lines.append(f"skipped {n} pair(s) the format cannot hold: "
                     + ", ".join(f"{r}={c}" for r, c in m["skipped"].items()))
        lines += [f"  {s['item_id']} (shard {s['shard']}, row {s['row']}): {s['reason']}" for s in m["skipped_pairs"][:show]]
        if n > show:
            lines.append(f"  … and {n - show} more (all in {MANIFEST})")
    else:
        lines.append("skipped 0 pairs")
    for s in m["shards_skipped"]:
        lines.append(f"shard {s['shard']} left out: {s['reason']}")
    if m.get("config"):
        lines.append(f"trainer config: {Path(out) / m['config']}")
    if m.get("config_masked"):
        lines.append(f"with the edit masks (masked Flow-DPO): {Path(out) / m['config_masked']}")
    lines.append(f"manifest: {Path(out) / MANIFEST}")
    return "\n".join(lines)
