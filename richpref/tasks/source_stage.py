"""The source as an ordinary stage: it reads no other stage; shard k holds the source's rows
[k * shard_size, (k + 1) * shard_size), each kept or rejected with a reason (tasks/source.py)."""
from __future__ import annotations

import math
from itertools import islice

import pyarrow as pa

from ..schemas.config import Profile
from ..schemas.tables import PROMPTS, rows_to_table
from .base import Stage, StageInputs
from .source import VERSION, SourceError, _load_dataset, iter_source_rows, source_fingerprint


def shard_count(profile: Profile) -> int:
    cfg = profile.source
    ds, source_id = _load_dataset(cfg)
    rows = len(ds) if cfg.limit is None else min(cfg.limit, len(ds))
    if rows == 0:
        raise SourceError(f"the source {source_id!r} has no rows")
    return math.ceil(rows / cfg.shard_size)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    n = profile.source.shard_size
    rows = list(islice(iter_source_rows(profile.source), inputs.shard * n, (inputs.shard + 1) * n))
    return rows_to_table(rows, PROMPTS)


STAGE = Stage(name="source", version=VERSION, section="source", reads=(), compute=compute,
              key_extra=lambda profile: source_fingerprint(profile.source), shard_count=shard_count)
