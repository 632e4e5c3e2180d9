"""A streamed Hub dataset read shard after shard continues one stream: no skip(start) per shard."""
from __future__ import annotations

import datasets

from richpref.sources.hf import StreamingPart


def _part(n: int) -> StreamingPart:
    """The reader as it is after opening a Hub dataset (that step needs the Hub), over a local stream."""
    part = object.__new__(StreamingPart)
    part.name, part.revision, part._rows = "local", "r", n
    part.ds = datasets.Dataset.from_dict({"caption": [f"c{i}" for i in range(n)]}).to_iterable_dataset()
    part._cursor, part.skips = None, 0
    return part


def test_shards_read_in_order_open_one_stream_and_a_jump_opens_another():
    part = _part(10)
    got = [part.read(a, min(10, a + 3), ["caption"]) for a in range(0, 10, 3)]
    assert [r["caption"] for rows in got for r in rows] == [f"c{i}" for i in range(10)]
    assert part.skips == 1  # before: one skip(start) stream per shard, reading rows 0..start each time
    assert part.read(3, 6, ["caption"]) == [{"caption": f"c{i}"} for i in range(3, 6)]
    assert part.skips == 2
