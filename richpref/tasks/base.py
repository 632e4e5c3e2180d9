"""What every stage shares: its declaration, its content key, and the thin Prefect task around it.

A stage is a pure function from its input shard(s) to one output shard (`compute`). Everything about
files, keys, logs and Prefect lives here, once, so a stage module holds only what its stage does.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from ..schemas.config import Profile, config_hash
from ..schemas.tables import OK, REJECTED
from ..storage import RunStore, ShardManifest

log = logging.getLogger("richpref")


class InjectedFault(RuntimeError):
    """Raised where RICHPREF_FAULTS asks for it: how tests and benchmarks simulate crashes."""


class SimulatedOutOfMemory(InjectedFault):
    """An out-of-memory error injected by RICHPREF_FAULTS ("stage:shard:oom")."""


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (SimulatedOutOfMemory, torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def inject_fault(stage: str, shard: int, when: str) -> None:
    """RICHPREF_FAULTS="edit:1:raise,cutout:0:kill-after" fails shard 1 of edit before computing and
    SIGKILLs the process right after shard 0 of cutout is committed. Kinds: raise, kill (before
    computing), kill-write (output written to its temp name, not yet renamed), kill-after (committed),
    oom (out of memory on the first attempt at the configured batch size). Unset in normal runs."""
    spec = os.environ.get("RICHPREF_FAULTS", "")
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        name, idx, kind = parts[0], int(parts[1]), (parts[2] if len(parts) > 2 else "raise")
        if name != stage or idx != shard:
            continue
        if kind == "raise" and when == "before":
            raise InjectedFault(f"injected fault in {stage} shard {shard} (RICHPREF_FAULTS)")
        if kind == "oom" and when == "compute-first":
            raise SimulatedOutOfMemory(f"simulated out of memory in {stage} shard {shard} (RICHPREF_FAULTS)")
        if (kind, when) in (("kill", "before"), ("kill-write", "write"), ("kill-after", "after")):
            os.kill(os.getpid(), signal.SIGKILL)


class StageContractError(RuntimeError):
    """A stage lost or invented rows: a bug in the stage, never silently accepted."""


def row_keys(table: pa.Table) -> list:
    """A table's row keys: (item_id, candidate) once the edit stage has fanned items out, else item_id."""
    ids = table.column("item_id").to_pylist()
    if "candidate" in table.schema.names:
        return list(zip(ids, table.column("candidate").to_pylist()))
    return ids


@dataclass
class StageInputs:
    """The rows a stage works on (the kept rows of its driving input) plus lookups by key."""

    shard: int
    rows: pa.Table
    tables: dict[str, pa.Table]

    def lookup(self, stage: str, columns: list[str], *, rows: pa.Table | None = None,
               candidates: list[int] | None = None) -> pa.Table:
        """Columns of `stage`'s table for `rows` (default: this shard's rows), in the same order.

        Rows match on (item_id, candidate) when both sides have candidates (or `candidates` names one
        per row), else on item_id: an item's sample serves all of its edit candidates.
        """
        rows = self.rows if rows is None else rows
        src = self.tables[stage]
        missing = [c for c in columns if c not in src.schema.names]
        if missing:
            raise StageContractError(f"{stage} shard {self.shard} has no column(s) {missing}")
        ids = rows.column("item_id").to_pylist()
        by_candidate = "candidate" in src.schema.names and (candidates is not None or "candidate" in rows.schema.names)
        if by_candidate:
            cands = candidates if candidates is not None else rows.column("candidate").to_pylist()
            wanted = list(zip(ids, cands))
        else:
            wanted = ids
        index = {key: i for i, key in enumerate(row_keys(src) if by_candidate else src.column("item_id").to_pylist())}
        absent = [k for k in wanted if k not in index]
        if absent:
            raise StageContractError(f"{stage} shard {self.shard} lacks row(s) {absent[:3]}")
        return src.select(columns).take(pa.array([index[k] for k in wanted], type=pa.int64()))


@dataclass(frozen=True)
class Stage:
    name: str
    version: str  # bump when the stage's code changes what it computes
    section: str  # the profile section holding its config
    reads: tuple[str, ...]  # first one drives: its kept rows are this stage's input rows
    compute: Callable[[StageInputs, Profile], pa.Table]
    key_extra: Callable[[Profile], str] = field(default=lambda profile: "")
    output: str = ""  # the folder it writes; defaults to the stage name
    # Output rows per input row when the stage starts the (item_id, candidate) key (edit), else None.
    fan_out: Callable[[Profile], int] | None = None
    # The part of the section's config that decides the output, when not all of it does (a scoring
    # stage leaves the thresholds to the decision stage after it, so tuning one costs no model call).
    config_view: Callable[[Any], Any] | None = None

    @property
    def out(self) -> str:
        return self.output or self.name

    def content_key(self, profile: Profile, inputs: dict[str, ShardManifest]) -> str:
        """Same key <=> same output: stage code version, effective config, input contents."""
        payload = {
            "stage": self.name,
            "version": self.version,
            "config": config_hash(self.config_view(getattr(profile, self.section)) if self.config_view
                                  else getattr(profile, self.section)),
            "extra": self.key_extra(profile),
            "inputs": {name: inputs[name].sha256 for name in self.reads},
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_stage_shard(
    stage: Stage, shard: int, inputs: dict[str, ShardManifest], store: RunStore, profile: Profile, key: str
) -> ShardManifest:
    """Compute one shard unless it is already committed for `key`; write it atomically."""
    done = store.committed(stage.out, shard, key)
    if done is not None:
        return done
    inject_fault(stage.name, shard, "before")
    started = time.perf_counter()
    tables = {name: store.read_shard(name, shard) for name in stage.reads}
    driver = tables[stage.reads[0]]
    rows = driver.filter(pc.equal(driver.column("status"), OK))
    t0 = time.perf_counter()
    out, batch_size, retries = compute_splitting_on_oom(stage, StageInputs(shard=shard, rows=rows, tables=tables), profile)
    compute_s = time.perf_counter() - t0
    check_rows_accounted(stage.name, shard, rows, out, stage.fan_out(profile) if stage.fan_out else None)
    manifest = store.write_shard(stage.out, shard, out, key, before_commit=lambda: inject_fault(stage.name, shard, "write"))
    inject_fault(stage.name, shard, "after")
    wall = time.perf_counter() - started
    reasons = reject_reasons(out)
    log.info(
        "%s shard %05d: %d rows in %.2fs (%.1f rows/s), kept %d, rejected %d%s",
        stage.name, shard, manifest.rows, wall, manifest.rows / wall if wall else 0.0,
        manifest.kept, manifest.rejected, f" {reasons}" if reasons else "",
    )
    store.append_log(
        "work.jsonl",
        {"stage": stage.name, "shard": shard, "rows": manifest.rows, "kept": manifest.kept,
         "compute_s": round(compute_s, 4), "wall_s": round(wall, 4), "key": key, "at": time.time(),
         "batch_size": batch_size, "oom_retries": retries},
    )
    return manifest


def compute_splitting_on_oom(stage: Stage, inputs: StageInputs, profile: Profile) -> tuple[pa.Table, int | None, int]:
    """Run the stage; on out-of-memory, halve the stage's batch size and retry, down to 1, before the
    shard fails. Batch size is not part of the cache key, so the output stays the same shard."""
    cfg = getattr(profile, stage.section)
    batch_size = getattr(cfg, "batch_size", None)
    retries = 0
    while True:
        try:
            if retries == 0:
                inject_fault(stage.name, inputs.shard, "compute-first")
            return stage.compute(inputs, profile), batch_size, retries
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried, the rest re-raised
            if not is_out_of_memory(exc) or not batch_size or batch_size <= 1:
                raise
            smaller = max(1, batch_size // 2)
            log.warning("%s shard %05d: out of memory at batch size %d (%s); retrying at batch size %d",
                        stage.name, inputs.shard, batch_size, type(exc).__name__, smaller)
            from ..models.runtime import free_accelerator_memory

            free_accelerator_memory()
            batch_size, retries = smaller, retries + 1
            profile = profile.model_copy(update={stage.section: cfg.model_copy(update={"batch_size": batch_size})})
            cfg = getattr(profile, stage.section)


def check_rows_accounted(stage: str, shard: int, rows: pa.Table, out: pa.Table, fan_out: int | None = None) -> None:
    """Every input row leaves exactly once (kept or rejected with a reason); a fanning-out stage
    writes exactly `fan_out` candidates (0 .. fan_out-1) per input item."""
    if fan_out is not None:
        want = sorted((i, c) for i in rows.column("item_id").to_pylist() for c in range(fan_out))
        got = sorted(row_keys(out))
    elif "candidate" in out.schema.names and "candidate" in rows.schema.names:
        want, got = sorted(row_keys(rows)), sorted(row_keys(out))
    else:
        want, got = sorted(rows.column("item_id").to_pylist()), sorted(out.column("item_id").to_pylist())
    if want != got:
        lost = set(want) - set(got)
        extra = set(got) - set(want)
        raise StageContractError(
            f"{stage} shard {shard}: output rows do not match input rows (lost {sorted(lost)[:3]}, extra {sorted(extra)[:3]}"
            f"{', duplicated rows' if not lost and not extra else ''})"
        )
    if "status" not in out.schema.names:  # the exported pairs: every row is a kept pair
        return
    statuses = out.column("status").to_pylist()
    reasons = out.column("reason").to_pylist()
    for iid, s, r in zip(row_keys(out), statuses, reasons):
        if s not in (OK, REJECTED):
            raise StageContractError(f"{stage} shard {shard}: item {iid} has status {s!r}")
        if s == REJECTED and not r:
            raise StageContractError(f"{stage} shard {shard}: item {iid} rejected without a reason")


def reject_reasons(table: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    if "status" not in table.schema.names:
        return counts
    for s, r in zip(table.column("status").to_pylist(), table.column("reason").to_pylist()):
        if s == REJECTED:
            key = (r or "").split(":", 1)[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


def item_seed(base: int, item_id: str) -> int:
    """A per-item seed: an item's image depends on its id, never on its batch or shard."""
    return int(hashlib.sha256(f"{base}:{item_id}".encode()).hexdigest()[:8], 16)


def rejected(item_id: str, reason: str, **values: Any) -> dict:
    return {"item_id": item_id, "status": REJECTED, "reason": reason, **values}


def kept(item_id: str, **values: Any) -> dict:
    return {"item_id": item_id, "status": OK, "reason": None, **values}
