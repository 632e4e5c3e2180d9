"""What the shard runner checks and retries around a stage's pure function: out-of-memory halving
and the rows-accounted contract (every input row leaves once, kept or rejected with a reason)."""
from __future__ import annotations

import logging

import pyarrow as pa

from richpref.common.faults import inject_fault, is_out_of_memory
from richpref.schemas.config import Profile
from richpref.schemas.tables import OK, REJECTED
from richpref.tasks.base import Stage, StageContractError, StageInputs, row_keys

log = logging.getLogger("richpref")


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
            from richpref.models.runtime import free_accelerator_memory

            free_accelerator_memory()
            batch_size, retries = smaller, retries + 1
            profile = profile.model_copy(update={stage.section: cfg.model_copy(update={"batch_size": batch_size})})
            cfg = getattr(profile, stage.section)


def check_rows_accounted(stage: str, shard: int, rows: pa.Table, out: pa.Table, fan_out: int | None = None,
                         reads_rows: bool = True) -> None:
    """Every input row leaves exactly once (kept or rejected with a reason); a fanning-out stage
    writes exactly `fan_out` candidates (0 .. fan_out-1) per input item. A stage that reads no stage
    (the source) makes its rows: each once."""
    if not reads_rows:
        want = sorted(set(out.column("item_id").to_pylist()))
        got = sorted(out.column("item_id").to_pylist())
    elif fan_out is not None:
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


def reason_counts(manifests) -> dict[str, int]:
    """The reject reasons (`reject_reasons`, as each shard's manifest holds them) of several shards, summed."""
    out: dict[str, int] = {}
    for m in manifests:
        for code, n in m.reasons.items():
            out[code] = out.get(code, 0) + n
    return out


def reject_reasons(table: pa.Table) -> dict[str, int]:
    counts: dict[str, int] = {}
    if "status" not in table.schema.names:
        return counts
    for s, r in zip(table.column("status").to_pylist(), table.column("reason").to_pylist()):
        if s == REJECTED:
            key = (r or "").split(":", 1)[0]
            counts[key] = counts.get(key, 0) + 1
    return counts


