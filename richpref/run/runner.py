"""The shard runner: the one place that decides whether a shard is done, and computes it if not.

A shard is done when its manifest (`part-00003.manifest.json`, beside `part-00003.parquet`) carries
the content key it would be computed for now, and its Parquet file is there. The manifest is
written after the Parquet file is renamed into place, so its presence commits the shard. Plan,
status, resume and the flow read manifests only, never a shard's bytes.

Content key = stage name + code version + effective stage config + the shard index + the content
keys of the input shards (from their manifests). Change one stage's config: it and the stages after
it get new keys; nothing before does.

Computing a shard: lease it (leases.py) so that processes sharing a run do not compute it twice,
read its inputs, run the stage's pure function (halving the batch size on out of memory), check
that every input row left as kept or rejected-with-reason, write Parquet then manifest atomically,
and log one line to the run's work log.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from richpref.common.faults import inject_fault
from richpref.run.commit import LeaseLost, commit_once, commit_temporary, recover
from richpref.run.gpu_claims import shard_model_scope
from richpref.run.leases import Busy, Lease, current_holder, holder_alive, lease_prefix, try_lease
from richpref.common.objstore import cat_small, ensure_folder, read_many
from richpref.schemas.config import Profile, config_hash
from richpref.schemas.tables import OK
from richpref.run.shard_contract import check_rows_accounted, compute_splitting_on_oom, reject_reasons
from richpref.run.storage import RunStore
from richpref.tasks.base import Stage, StageInputs

log = logging.getLogger("richpref")

KEY_META = b"richpref.key"  # also recorded in the Parquet footer, as provenance


class CurateFailed(RuntimeError):
    """Some shards of a curate run failed (the message names them); rerun to redo only those."""


@dataclass(frozen=True)
class ShardManifest:
    """A committed shard: where it is, what it was computed for, what is in it. Never the data."""

    stage: str
    shard: int
    uri: str
    key: str
    rows: int
    kept: int
    sha256: str = ""  # of the file as written (computed from the bytes in memory, never re-read)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return self.rows - self.kept

    def to_dict(self) -> dict:
        return asdict(self)


def content_key(stage: Stage, profile: Profile, shard: int, inputs: dict[str, ShardManifest]) -> str:
    """Same key <=> same output: code version, effective config, shard, input shards' keys. A stage
    that reads no stage (the source) keys each shard itself, from the rows it reads."""
    return stage_keyer(stage, profile)(shard, {name: inputs[name].key for name in stage.reads})


def stage_keyer(stage: Stage, profile: Profile) -> Callable[[int, dict[str, str]], str]:
    """content_key of one stage and profile from the input shards' keys alone (a plan knows them before
    the inputs are committed), for keying many shards in a row: what their keys share (code version,
    config, extra; the source's look at its files) is worked out once, not once a shard."""
    if stage.shard_keys is not None:
        own = stage.shard_keys(profile)
        return lambda shard, input_keys: own(shard)
    shared = {
        "stage": stage.name,
        "version": stage.version,
        "config": config_hash(stage.config_view(getattr(profile, stage.section)) if stage.config_view
                              else getattr(profile, stage.section)),
        "extra": stage.key_extra(profile),
    }

    def key(shard: int, input_keys: dict[str, str]) -> str:
        payload = {**shared, "shard": shard, "inputs": {name: input_keys[name] for name in stage.reads}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return key


# manifests ----------------------------------------------------------------------------------------
def manifest_path(store: RunStore, out: str, shard: int) -> str:
    return f"{store.stage_dir(out)}/part-{shard:05d}.manifest.json"


def _parse(text: bytes) -> ShardManifest | None:
    try:
        return ShardManifest(**json.loads(text))
    except (ValueError, TypeError):
        return None  # unreadable or of another layout: not committed


def is_current(manifest: ShardManifest | None, key: str) -> bool:
    """The rule of completion, in one place: a shard is done when a committed manifest (its Parquet
    file listed beside it) carries the content key the shard has now."""
    return manifest is not None and manifest.key == key


def committed(store: RunStore, out: str, shard: int, key: str) -> ShardManifest | None:
    """The shard's manifest if it was committed for `key` and its file is there, else None."""
    try:
        m = _parse(cat_small(store.fs, manifest_path(store, out, shard)))
    except FileNotFoundError:
        return None
    if not is_current(m, key) or not store.fs.exists(store.shard_path(out, shard)):
        return None
    return replace(m, uri=store.uri(store.shard_path(out, shard)))  # where it is now (runs can be copied)


def _listing(store: RunStore, out: str) -> set[str]:
    """Names in a stage folder: one listing (a few pages on an object store), empty if no folder."""
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(store.stage_dir(out), detail=False)}
    except FileNotFoundError:
        return set()


def _manifests(store: RunStore, out: str, names: set[str], shards) -> dict[int, ShardManifest]:
    folder = store.stage_dir(out)
    wanted = [s for s in shards if f"part-{s:05d}.manifest.json" in names and f"part-{s:05d}.parquet" in names]
    got = read_many(store.fs, [f"{folder}/part-{s:05d}.manifest.json" for s in wanted])
    found = {}
    for s in wanted:
        data = got[f"{folder}/part-{s:05d}.manifest.json"]
        m = _parse(data) if data is not None else None
        if m is not None:
            found[s] = replace(m, uri=store.uri(store.shard_path(out, s)))
    return found


def stage_manifests(store: RunStore, out: str) -> dict[int, ShardManifest]:
    """Every committed shard of a stage folder, whatever its key (one listing + the manifests, read
    concurrently)."""
    names = _listing(store, out)
    shards = sorted(int(n[5:-14]) for n in names if n.startswith("part-") and n.endswith(".manifest.json"))
    return _manifests(store, out, names, shards)


def committed_many(store: RunStore, out: str, keys: dict[int, str]) -> dict[int, ShardManifest]:
    """`committed` for many shards of one stage: one listing, their manifests read concurrently."""
    found = _manifests(store, out, _listing(store, out), sorted(keys))
    return {s: m for s, m in found.items() if is_current(m, keys[s])}


def leased_shards(store: RunStore, out: str, shards: list[int], names: set[str] | None = None) -> set[int]:
    """Which of `shards` a live holder is computing now: one listing of the stage folder (or `names`,
    one made already), and the newest lease record of each leased shard, read concurrently."""
    names = _listing(store, out) if names is None else names
    tops: dict[int, int] = {}
    for n in names:
        m = re.fullmatch(r"part-(\d+)\.lease-(\d+)", n)
        if m:
            s, g = int(m.group(1)), int(m.group(2))
            tops[s] = max(g, tops.get(s, -1))
    wanted = {s: f"{lease_prefix(store.shard_path(out, s))}{tops[s]:04d}" for s in shards if s in tops}
    got = read_many(store.fs, list(wanted.values()))
    held = set()
    for s, path in wanted.items():
        try:
            record = json.loads(got[path]) if got[path] is not None else None
        except ValueError:
            record = None  # being written: its writer is alive
            held.add(s)
        if record is not None and holder_alive(record):
            held.add(s)
    return held


def tidy_done(store: RunStore, out: str, done: set[int]) -> None:
    """After a stage's pass: remove what holders killed inside their commit left beside shards that are
    done now (lease records, and the temporary files of the shard, its manifest or a lease record's
    renewal) where no live holder has the shard. One listing of the stage folder; lease records are
    read only where something was left."""
    names = _listing(store, out)
    left: dict[int, list[str]] = {}
    for n in names:
        m = re.match(r"part-(\d+)\.", n)
        left_behind = commit_temporary(n) or re.fullmatch(r"part-\d+\.lease-\d+(\.tmp-\w+)?", n)
        if m and left_behind and int(m.group(1)) in done:
            left.setdefault(int(m.group(1)), []).append(n)
    held = leased_shards(store, out, sorted(left), names) if left else set()
    for shard, files in sorted(left.items()):
        if shard not in held:  # a live holder (another process recomputing it) cleans up after itself
            for n in files:
                with contextlib.suppress(FileNotFoundError):
                    store.fs.rm_file(f"{store.stage_dir(out)}/{n}")
            log.info("%s/part-%05d: removed %s, left by a holder killed while committing it", out, shard,
                     ", ".join(sorted(files)))


def stage_shards(stage: Stage, profile: Profile, manifests: dict[str, dict[int, ShardManifest]]) -> list[int]:
    """The shards a stage has this run: its own count when it reads no stage (the source), else the
    shards every input stage has committed."""
    if not stage.reads:
        return list(range(stage.count_shards(profile)))
    return sorted(set.intersection(*(set(manifests[r]) for r in stage.reads)))


def drop_shards_from(store: RunStore, outs: list[str], first: int) -> None:
    """A smaller source than last time: shards from `first` on are not part of this run any more."""
    for out in outs:
        for s in store.shards(out):
            if s >= first:
                for path in (manifest_path(store, out, s), store.shard_path(out, s)):
                    if store.fs.exists(path):
                        store.fs.rm(path)


# computing ----------------------------------------------------------------------------------------
def leased_elsewhere(store: RunStore, out: str, shard: int) -> dict | None:
    """The live holder computing this shard now, if any."""
    return current_holder(store.fs, store.shard_path(out, shard))


def run_shard(stage: Stage, shard: int, inputs: dict[str, ShardManifest], store: RunStore, profile: Profile,
              key: str) -> ShardManifest | Busy:
    """Return the shard's manifest: committed already, or computed now under its lease. Busy when a
    live holder elsewhere is computing it (ask again later)."""
    done = committed(store, stage.out, shard, key)
    if done is not None:
        return done
    ensure_folder(store.fs, store.stage_dir(stage.out))
    lease = try_lease(store.fs, store.shard_path(stage.out, shard))
    if isinstance(lease, Busy):
        return lease
    with lease:
        listed = recover(store, store.shard_path(stage.out, shard), manifest_path(store, stage.out, shard), key)
        done = committed(store, stage.out, shard, key) if listed else None  # finished by another holder just before ours
        if done is not None:
            return done
        try:
            return _compute(stage, shard, inputs, store, profile, key, lease)
        except LeaseLost as exc:
            log.warning("%s", exc)
            return Busy(None)  # the process that took the lease over commits it


def _input_rows(stage: Stage, shard: int, store: RunStore) -> tuple[pa.Table, dict[str, pa.Table]]:
    if not stage.reads:  # a stage that reads no stage (the source) makes its rows itself
        return pa.table({"item_id": pa.array([], pa.string())}), {}
    tables = {name: store.read_shard(name, shard) for name in stage.reads}
    driver = tables[stage.reads[0]]
    return driver.filter(pc.equal(driver.column("status"), OK)), tables


def _compute(stage: Stage, shard: int, inputs: dict[str, ShardManifest], store: RunStore, profile: Profile,
             key: str, lease: Lease | None = None) -> ShardManifest | Busy:
    inject_fault(stage.name, shard, "before")
    started = time.perf_counter()
    rows, tables = _input_rows(stage, shard, store)
    with shard_model_scope(stage, profile):
        t0, cpu0 = time.perf_counter(), time.process_time()  # from its turn: the wait for it is not compute
        out, batch_size, retries = compute_splitting_on_oom(stage, StageInputs(shard=shard, rows=rows, tables=tables,
                                                                        scratch=store.scratch_dir(stage.out)), profile)
        compute_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    check_rows_accounted(stage.name, shard, rows, out, stage.fan_out(profile) if stage.fan_out else None,
                         reads_rows=bool(stage.reads))
    manifest = write_shard(store, stage.out, shard, out, key, before_commit=lambda: inject_fault(stage.name, shard, "write"),
                           lease=lease)
    if manifest is None:
        return Busy(None)  # another holder committed this key first
    inject_fault(stage.name, shard, "after")
    wall = time.perf_counter() - started
    log.info(
        "%s shard %05d: %d rows in %.2fs (%.1f rows/s), kept %d, rejected %d%s",
        stage.name, shard, manifest.rows, wall, manifest.rows / wall if wall else 0.0,
        manifest.kept, manifest.rejected, f" {manifest.reasons}" if manifest.reasons else "",
    )
    store.append_log(
        "work.jsonl",
        {"stage": stage.name, "shard": shard, "rows": manifest.rows, "kept": manifest.kept,
         "compute_s": round(compute_s, 4), "wall_s": round(wall, 4), "key": key, "at": time.time(),
         "batch_size": batch_size, "oom_retries": retries, **_cpu_record(cpu_s)},
    )
    return manifest


def parquet_bytes(table: pa.Table) -> bytes:
    """A shard's Parquet bytes. A shard that kept no row is written with no row group: a row group of
    0 rows is refused by `datasets` ("BatchSize must be greater than 0"), so a pairs folder with one
    empty shard could not be loaded with the card's `load_dataset` line."""
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as writer:
        if table.num_rows:
            writer.write_table(table)
    return buf.getvalue()


def _cpu_record(cpu_s: float) -> dict:
    """Where the shard ran and on how many cores: CPU seconds of its process while it computed (all
    its threads, so a shard computed beside another in one process shares the other's), the process,
    and torch's thread count (2 workers × 2 threads on 2 cores is oversubscribed)."""
    torch = sys.modules.get("torch")
    return {"cpu_s": round(cpu_s, 4), "pid": os.getpid(),
            "torch_threads": torch.get_num_threads() if torch is not None else None}


def write_shard(store: RunStore, out: str, shard: int, table: pa.Table, key: str, before_commit=None,
                lease: Lease | None = None) -> ShardManifest | None:
    """Parquet to a temporary name, renamed into place, then the manifest: readers never see a
    partial shard, and a shard without its manifest is not done. Under a `lease` the commit is made
    once per content key (richpref/run/commit.py): None when another holder committed it; LeaseLost
    when the lease was taken over."""
    meta = dict(table.schema.metadata or {})
    meta[KEY_META] = key.encode()
    table = table.replace_schema_metadata(meta)
    data = parquet_bytes(table)
    kept = (sum(1 for s in table.column("status").to_pylist() if s == OK) if "status" in table.schema.names
            else table.num_rows)
    manifest = ShardManifest(stage=out, shard=shard, uri=store.uri(store.shard_path(out, shard)), key=key,
                             rows=table.num_rows, kept=kept, sha256=hashlib.sha256(data).hexdigest(),
                             reasons=reject_reasons(table))
    if lease is not None:
        won = commit_once(store, store.shard_path(out, shard), manifest_path(store, out, shard), data,
                          manifest.to_dict(), lease, before_commit=before_commit)
        return manifest if won else None
    store.write_bytes(store.shard_path(out, shard), data, before_commit=before_commit)
    store.write_bytes(manifest_path(store, out, shard), json.dumps(manifest.to_dict(), indent=1).encode())
    return manifest


# what is done -------------------------------------------------------------------------------------
@dataclass
class StageState:
    """A stage's shards as the runner sees them now: done (committed for their current key), to do
    (inputs committed; output missing or of another key), blocked (an input shard is not done)."""
    stage: str
    done: dict[int, ShardManifest] = field(default_factory=dict)
    todo: dict[int, str] = field(default_factory=dict)  # shard -> the key it is to be computed for
    blocked: list[int] = field(default_factory=list)
    inputs: dict[int, dict[str, ShardManifest]] = field(default_factory=dict)  # of done and to-do shards

    @property
    def keys(self) -> dict[int, str]:
        return {**{s: m.key for s, m in self.done.items()}, **self.todo}


def stage_state(stage: Stage, profile: Profile, store: RunStore, upstream: dict[str, dict[int, ShardManifest]],
                source_shards: int | None = None) -> StageState:
    """Which shards of `stage` are done, to do or blocked, given its input stages' done shards
    (`upstream`). `source_shards`: a stage that reads no stage's shard count, when the caller has
    counted it. (A plan ahead of the run: richpref/run/plan.py.)"""
    state = StageState(stage.name)
    count = source_shards if source_shards is not None else (0 if stage.reads else stage.count_shards(profile))
    candidates = range(count) if not stage.reads else sorted(set.union(*(set(upstream[r]) for r in stage.reads)))
    have = stage_manifests(store, stage.out)
    key_of = stage_keyer(stage, profile)
    for s in candidates:
        if any(s not in upstream[r] for r in stage.reads):
            state.blocked.append(s)
            continue
        inputs = {r: upstream[r][s] for r in stage.reads}
        key = key_of(s, {r: m.key for r, m in inputs.items()})
        state.inputs[s] = inputs
        if is_current(have.get(s), key):
            state.done[s] = have[s]
        else:
            state.todo[s] = key
    return state


def shard_count_from_rows(rows: int, shard_size: int) -> int:
    return max(1, math.ceil(rows / shard_size))
