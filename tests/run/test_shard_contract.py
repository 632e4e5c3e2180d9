"""The shard runner's out-of-memory halving (richpref/run/shard_contract.py), by hand on a stage whose
compute runs out of memory above a batch size. The whole path through a curate run (a fault injected
into critique): tests/scenarios/test_oom_retry.py."""
from __future__ import annotations

from dataclasses import replace

import pytest

from richpref.common.faults import SimulatedOutOfMemory
from richpref.run.shard_contract import compute_splitting_on_oom
from richpref.schemas.config import load_profile
from richpref.tasks import stages_for
from richpref.tasks.base import StageInputs


def _critique_fitting(fits: int, error=SimulatedOutOfMemory):
    """The tiny profile's critique stage at batch size 8, its compute failing with `error` above `fits`."""
    profile = load_profile("tiny")
    profile = profile.model_copy(update={"critique": profile.critique.model_copy(update={"batch_size": 8})})
    tried = []

    def compute(inputs, p):
        tried.append(p.critique.batch_size)
        if p.critique.batch_size > fits:
            raise error(f"batch {p.critique.batch_size}")
        return f"computed at {p.critique.batch_size}"

    stage = next(s for s in stages_for(profile) if s.name == "critique")
    return replace(stage, compute=compute), profile, tried


def test_out_of_memory_halves_the_batch_down_to_one_then_fails():
    inputs = StageInputs(shard=3, rows=None, tables={})
    stage, profile, tried = _critique_fitting(fits=2)
    assert compute_splitting_on_oom(stage, inputs, profile) == ("computed at 2", 2, 2)
    assert tried == [8, 4, 2]
    assert profile.critique.batch_size == 8  # the caller's profile is left as it was

    stage, profile, tried = _critique_fitting(fits=0)
    with pytest.raises(SimulatedOutOfMemory, match="batch 1"):
        compute_splitting_on_oom(stage, inputs, profile)
    assert tried == [8, 4, 2, 1]

    stage, profile, tried = _critique_fitting(fits=8)
    assert compute_splitting_on_oom(stage, inputs, profile) == ("computed at 8", 8, 0)


def test_any_other_error_fails_the_shard_at_once():
    stage, profile, tried = _critique_fitting(fits=2, error=ValueError)
    with pytest.raises(ValueError, match="batch 8"):
        compute_splitting_on_oom(stage, StageInputs(shard=0, rows=None, tables={}), profile)
    assert tried == [8]


# Every input row leaves once, kept or rejected with a reason ----------------------------------------

def _t(ids, status=None, reason=None, candidate=None):
    import pyarrow as pa

    cols = {"item_id": ids}
    if candidate is not None:
        cols["candidate"] = candidate
    if status is not None:
        cols["status"], cols["reason"] = status, reason or [None] * len(ids)
    return pa.table(cols)


def test_rows_accounted_holds_for_each_row_once_kept_or_rejected_with_a_reason():
    from richpref.run.shard_contract import check_rows_accounted

    rows = _t(["a", "b"])
    check_rows_accounted("filter", 0, rows, _t(["b", "a"], ["ok", "rejected"], [None, "too_dark"]))
    # a fanning-out stage: exactly candidates 0 .. fan_out-1 of each item
    check_rows_accounted("edit", 0, rows, _t(["a", "a", "b", "b"], ["ok"] * 4, candidate=[1, 0, 0, 1]), fan_out=2)
    # after the fan-out, rows match on (item, candidate)
    check_rows_accounted("cutout", 0, _t(["a", "a"], candidate=[0, 1]), _t(["a", "a"], ["ok"] * 2, candidate=[1, 0]))
    # a stage that reads items before the fan-out matches on item_id, whatever candidate it writes
    check_rows_accounted("score", 0, rows, _t(["a", "b"], ["ok"] * 2, candidate=[0, 0]))
    # the source makes its rows: each item once
    check_rows_accounted("source", 0, None, _t(["x", "y"], ["ok", "ok"]), reads_rows=False)
    # the exported pairs have no status: every row is a kept pair
    check_rows_accounted("export", 0, rows, _t(["a", "b"]))


@pytest.mark.parametrize("out, kwargs, message", [
    (_t(["a"], ["ok"]), {}, r"filter shard 4: output rows do not match input rows \(lost \['b'\], extra \[\]\)"),
    (_t(["a", "b", "c"], ["ok"] * 3), {}, r"\(lost \[\], extra \['c'\]\)"),
    (_t(["a", "b", "b"], ["ok"] * 3), {}, r"\(lost \[\], extra \[\], duplicated rows\)"),
    (_t(["a", "a", "b"], ["ok"] * 3, candidate=[0, 1, 0]), {"fan_out": 2}, r"lost \[\('b', 1\)\]"),
    (_t(["a", "a", "b", "b"], ["ok"] * 4, candidate=[0, 2, 0, 1]), {"fan_out": 2},
     r"lost \[\('a', 1\)\], extra \[\('a', 2\)\]"),
    (_t(["a", "b"], ["ok", "maybe"]), {}, r"filter shard 4: item b has status 'maybe'"),
    (_t(["a", "b"], ["ok", "rejected"], [None, ""]), {}, r"filter shard 4: item b rejected without a reason"),
])
def test_rows_accounted_refuses_a_lost_extra_or_duplicated_row_and_a_rejection_without_reason(out, kwargs, message):
    from richpref.run.shard_contract import check_rows_accounted
    from richpref.tasks.base import StageContractError

    with pytest.raises(StageContractError, match=message):
        check_rows_accounted("filter", 4, _t(["a", "b"]), out, **kwargs)


def test_after_the_fan_out_an_item_candidate_lost_is_found_though_its_item_is_there():
    from richpref.run.shard_contract import check_rows_accounted
    from richpref.tasks.base import StageContractError

    with pytest.raises(StageContractError, match=r"lost \[\('a', 1\)\]"):
        check_rows_accounted("cutout", 0, _t(["a", "a"], candidate=[0, 1]), _t(["a", "a"], ["ok"] * 2, candidate=[0, 0]))


def test_a_source_that_makes_one_item_twice_breaks_the_contract():
    from richpref.run.shard_contract import check_rows_accounted
    from richpref.tasks.base import StageContractError

    with pytest.raises(StageContractError, match="duplicated rows"):
        check_rows_accounted("source", 0, None, _t(["x", "x"], ["ok", "rejected"], [None, "duplicate: x"]), reads_rows=False)


def test_reject_reasons_count_by_code_and_sum_over_shards():
    from types import SimpleNamespace

    from richpref.run.shard_contract import reason_counts, reject_reasons

    t = _t(["a", "b", "c", "d"], ["rejected", "ok", "rejected", "rejected"],
           ["duplicate: x1", None, "duplicate: x2: its caption", "too_dark"])
    assert reject_reasons(t) == {"duplicate": 2, "too_dark": 1}
    assert reject_reasons(_t(["a"])) == {}
    shards = [SimpleNamespace(reasons={"duplicate": 2, "too_dark": 1}), SimpleNamespace(reasons={"too_dark": 4})]
    assert reason_counts(shards) == {"duplicate": 2, "too_dark": 5}
