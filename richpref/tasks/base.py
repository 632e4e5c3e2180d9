"""What every stage shares: its declaration and the view of its input rows.

A stage is a pure function from its input shard(s) to one output shard (`compute`). Keys, files,
leases, logs and retries live in the shard runner (richpref/run/runner.py), so a stage module holds only
what its stage does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa

from ..schemas.config import Profile
from ..schemas.tables import OK, REJECTED


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
    rows: pa.Table | None  # None for the source, whose rows come from outside the run
    tables: dict[str, pa.Table]
    scratch: str | None = None  # a folder (local path or URL) for what a stage may reuse across its shards (source: dedupe digests)

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
class ModelUse:
    """One model a stage loads, as the profile names it: doctor resolves and sizes every one before
    anything loads (richpref/doctor/checks.py)."""

    field: str  # the profile key, e.g. "edit.controlnet" or "score.rewards.clip.model"
    ref: str | None  # the model reference (None: not used by this profile)
    kind: str  # diffusers | vlm | rembg | reward | annotator
    cfg: Any  # the section it runs under (its device and dtype)
    file: str | None = None  # a checkpoint file a resolved directory must hold (a reward's `file:`)


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
    # A stage that reads no other stage (the source) counts its shards and keys each one itself:
    # `shard_keys(profile)` looks at its input once (a listing, a version per file) and returns the key
    # of each shard, for a plan or pass that keys thousands of them in a row.
    count_shards: Callable[[Profile], int] | None = None
    shard_keys: Callable[[Profile], Callable[[int], str]] | None = None
    # The part of the section's config that decides the output, when not all of it does (a scoring
    # stage leaves the thresholds to the decision stage after it, so tuning one costs no model call).
    config_view: Callable[[Any], Any] | None = None
    # Whether its shards load a model: only those claim a `GPU` resource on a Dask cluster; the
    # others (source, filter, relabel, export) run on any worker's CPU slots.
    loads_model: bool = True
    # Its output table's schema (richpref/schemas/tables.py), or a function of the profile when its
    # columns depend on it (one per reward).
    schema: pa.Schema | Callable[[Profile], pa.Schema] | None = None
    # The models its shards load: `models(profile)` names them (doctor's preflight), `load(profile)`
    # loads them through the stage's own loader, so its shards then find them resident, and returns
    # their ids (doctor's measured load). Both absent on a stage that loads no model.
    models: Callable[[Profile], list[ModelUse]] | None = None
    load: Callable[[Profile], list[str]] | None = None

    @property
    def out(self) -> str:
        return self.output or self.name

    def output_schema(self, profile: Profile) -> pa.Schema:
        if self.schema is None:
            raise StageContractError(f"stage {self.name} declares no output schema")
        return self.schema if isinstance(self.schema, pa.Schema) else self.schema(profile)


def item_seed(base: int, item_id: str) -> int:
    """A per-item seed: an item's image depends on its id, never on its batch or shard."""
    return int(hashlib.sha256(f"{base}:{item_id}".encode()).hexdigest()[:8], 16)


def rejected(item_id: str, reason: str, **values: Any) -> dict:
    return {"item_id": item_id, "status": REJECTED, "reason": reason, **values}


def kept(item_id: str, **values: Any) -> dict:
    return {"item_id": item_id, "status": OK, "reason": None, **values}
