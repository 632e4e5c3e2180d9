"""The affinity plan of richpref/run/affinity.py: worker shares, and a small plan traced by hand."""
from __future__ import annotations

import json

import pytest

from richpref.run.affinity import (DEFAULT_COSTS, StageCost, Task, costs_for, plan, read_doctor_table, read_start_s,
                                   stage_costs, worker_shares)


def test_worker_shares_are_proportional_to_work():
    assert worker_shares({"a": 1.0, "b": 3.0}, 4) == {"a": 1.0, "b": 3.0}
    assert worker_shares({"a": 2.0, "b": 2.0, "c": 4.0}, 8) == {"a": 2.0, "b": 2.0, "c": 4.0}
    assert worker_shares({"a": 0.0}, 3) == {"a": 0.0}


def test_a_cheap_stage_with_a_long_load_runs_on_one_worker_the_heavy_one_on_the_others():
    # a: 0.5 s per shard after a 10 s load; b (reads a): 1 s per shard after a 0.1 s load; 3 workers.
    # t=0   w0 loads a, runs a0 -> 10.5. w1, w2: a is held and its load (10 s) exceeds the work they
    #       would take over (2.5 s left / 2), nothing else is ready: they wait for w0.
    # 10.5  w0 a1 -> 11.0; w1 loads b (no holder), b0 -> 11.6; w2 waits for b1 (ready at 11.0).
    # 11.0  w0 a2 -> 11.5; w2 loads b, b1 -> 12.1.   11.5  w0 a3 -> 12.0.   11.6  w1 b2 -> 12.6.
    # 12.0  w0 a4 -> 12.5.   12.1  w2 b3 -> 13.1.   12.5  w0 a5 -> 13.0.   12.6  w1 b4 -> 13.6.
    # 13.0  w0: no a left, b5 ready, 0.1 s load <= 1 s left / 3: loads b, b5 -> 14.1.
    tasks = [Task("a", s, (), 0.5, 10.0) for s in range(6)] + [Task("b", s, (("a", s),), 1.0, 0.1) for s in range(6)]
    p = plan(tasks, 3)
    assert {s: p.home[("a", s)] for s in range(6)} == {s: 0 for s in range(6)}
    assert {s: p.home[("b", s)] for s in range(6)} == {0: 1, 1: 2, 2: 1, 3: 2, 4: 1, 5: 0}
    assert p.stages_of == {0: ["a", "b"], 1: ["b"], 2: ["b"]} and p.loads == 4
    assert p.wall_s == pytest.approx(14.1)
    assert [k for k, _ in sorted(p.rank.items(), key=lambda kv: kv[1])][:3] == [("a", 0), ("a", 1), ("b", 0)]


def test_model_free_stages_pass_their_inputs_time_on_and_get_no_home():
    tasks = [Task("a", s, (), 1.0, 0.0) for s in range(2)] + [Task("f", s, (("a", s),), 0.0) for s in range(2)] + \
            [Task("b", s, (("f", s),), 1.0, 0.0) for s in range(2)]
    p = plan(tasks, 1)
    assert set(p.home) == {("a", 0), ("a", 1), ("b", 0), ("b", 1)} and p.wall_s == pytest.approx(4.0)


def test_the_default_table_plan_loads_fewer_models_than_every_worker_loading_every_one():
    names = list(DEFAULT_COSTS)
    model = {"sample", "critique", "instruct", "edit", "cutout", "check", "score"}
    tasks = [Task(n, s, ((names[i - 1], s),) if i else (), 4 * DEFAULT_COSTS[n].s_per_item if n in model else 0.0,
                  0.5 * DEFAULT_COSTS[n].load_s) for i, n in enumerate(names) for s in range(256)]
    p = plan(tasks, 8)
    assert len(p.home) == 7 * 256 and p.loads < 8 * 7
    assert [w for w, st in p.stages_of.items() if "sample" in st] == [0]  # its 5 s load is paid once


def test_the_plan_of_a_curate_chain_with_several_inputs_per_stage_finishes():
    # The real stages' reads; at the end workers wait at the same instant while one of them holds
    # the last stage's model: that one is asked before the plan gives up.
    from richpref.run.pipeline import _model_seconds, affinity_plan
    from richpref.schemas.config import load_profile
    from richpref.tasks import ALL_STAGES

    todo = [(i, st, s) for i, st in enumerate(ALL_STAGES) for s in range(16)]
    p = affinity_plan(todo, *_model_seconds(todo, load_profile("tiny"), DEFAULT_COSTS), 4)
    assert len(p.home) == 7 * 16 and p.loads < 4 * 7


def test_the_table_comes_from_a_doctor_file_or_the_built_in_one(tmp_path):
    path = tmp_path / "doctor.json"
    path.write_text(json.dumps({"report": {"stages": [{"stage": "sample", "s_per_item": 0.5, "load_s": 3.0},
                                                      {"stage": "check", "s_per_item": 1.5, "load_s": 1.0}]}}))
    costs, where = stage_costs(str(path))
    assert costs == read_doctor_table(path) == {"sample": StageCost(0.5, 3.0), "check": StageCost(1.5, 1.0)}
    assert str(path) in where
    assert stage_costs(None)[0] is DEFAULT_COSTS
    assert costs_for(["sample", "score"], costs)["score"] == StageCost(1.0, 2.0)  # missing: the medians
    # A file written before the doctor timed a worker's start apart, and the built-in table: none.
    assert read_start_s(str(path)) == read_start_s(None) == 0.0
    path.write_text(json.dumps({"report": {"start_s": 4.5, "stages": []}}))
    assert read_start_s(str(path)) == 4.5


def test_the_plans_busy_counts_model_calls_not_a_shards_fixed_cost():
    # 4 shards of 1 s slot time each, 0.25 s of it the task's fixed cost, on 2 workers: wall 2 s,
    # model calls 4 x 0.75 = 3 s, busy 3 / (2 x 2) = 0.75 (not 1.0, the slots' held fraction).
    p = plan([Task("a", s, (), 1.0, 0.0, fixed_s=0.25) for s in range(4)], 2)
    assert p.wall_s == pytest.approx(2.0) and p.model_s == pytest.approx(3.0) and p.busy == pytest.approx(0.75)


def test_a_curate_plans_model_seconds_leave_out_the_shard_overhead(monkeypatch):
    from richpref.run.pipeline import _model_seconds, affinity_plan
    from richpref.schemas.config import load_profile
    from richpref.tasks import ALL_STAGES

    monkeypatch.setenv("RICHPREF_SHARD_OVERHEAD_S", "0.3")
    profile = load_profile("tiny")
    todo = [(i, st, s) for i, st in enumerate(ALL_STAGES) for s in range(4)]
    p = affinity_plan(todo, *_model_seconds(todo, profile, DEFAULT_COSTS), 2)
    calls = 4 * profile.source.shard_size * sum(DEFAULT_COSTS[st.name].s_per_item for st in ALL_STAGES if st.loads_model)
    assert p.model_s == pytest.approx(calls)


def test_the_plan_runs_a_short_stage_fed_by_a_long_one_alongside_it():
    # b's shards take 1 s, c's (fed by b) 0.4 s: c's share of the 4 workers is more than one. Without
    # `pulled_to` every worker kept b while a shard of it was ready, and all 16 of c's shards came
    # after b's last; now a worker leaves b for c while b runs (7 after).
    tasks = [Task("a", s, (), 0.05, 0.3) for s in range(16)]
    tasks += [Task("b", s, (("a", s),), 1.0, 0.3) for s in range(16)]
    tasks += [Task("c", s, (("b", s),), 0.4, 0.3) for s in range(16)]
    p = plan(tasks, 4)
    last_b = max(p.rank[("b", s)] for s in range(16))
    assert sum(p.rank[("c", s)] > last_b for s in range(16)) <= 8
    assert sorted(k for k in p.home if k[0] == "c") == [("c", s) for s in range(16)]


def test_the_last_holder_of_a_stage_with_ready_shards_is_not_pulled_away():
    from richpref.run.affinity import pulled_to

    share, loads = {"instruct": 0.1, "check": 5.4, "score": 1.5}, {"instruct": 0.2, "check": 0.2, "score": 1.2}
    ask = dict(ready=["instruct", "score"], ready_s=lambda k: 10.0, held={"instruct", "check"}, share=share, load_s=loads)
    # Its last 8 shards would wait for a worker holding check to run out of check's, at the end.
    assert pulled_to("instruct", holders_of_own=1, **ask) is None
    assert pulled_to("instruct", holders_of_own=2, **ask) == "score"
    assert pulled_to("check", holders_of_own=6, **ask) == "score"
    assert pulled_to("check", holders_of_own=6, **{**ask, "ready_s": lambda k: 1.0}) is None  # pays no loads


def test_a_worker_is_pulled_to_an_unheld_stage_only_at_its_share_and_where_the_ready_work_pays_both_loads():
    from richpref.run.affinity import pulled_to

    def pull(other_share=2.75, ready_s=1.5, held=(), ready=("a", "b")):
        return pulled_to("a", list(ready), lambda k: ready_s, {"a", *held}, {"a": 3.5, "b": other_share},
                         2, {"a": 0.5, "b": 1.0})

    # a, held by 2 of its 3.5 workers' share, would lack 2.5 of it without this worker: b must want more
    assert pull() == "b" and pull(other_share=2.5) is None
    assert pull(ready_s=1.5) == "b" and pull(ready_s=1.49) is None  # loads there (1.0) and back (0.5)
    assert pull(held=("b",)) is None and pull(ready=("a",)) is None
    # a stage that wants less than one worker is not worth one; one that wants exactly one is
    assert [pulled_to("a", ["b"], lambda k: 9.0, {"a"}, {"a": 1.5, "b": b}, 2, {"a": 0.5, "b": 1.0})
            for b in (0.9, 1.0)] == [None, "b"]


def test_a_free_worker_switches_to_the_stage_furthest_below_its_share_whose_load_its_work_pays():
    from richpref.run.affinity import choose_stage

    def choose(load_b=2.0, holders_c=0):
        return choose_stage(["b", "c"], {"b": 1, "c": holders_c}, {"b": load_b, "c": 5.0}, {"b": 4.0, "c": 2.0}, 4)

    # shares of 4 workers: b 8/3 (held by 1), c 4/3 (by none); b's load is worth its half of 4 s left
    assert choose() == "b"
    assert choose(load_b=2.01) == "c"  # no longer paid by b's work: c, whose load nobody else pays
    assert choose(load_b=2.01, holders_c=1) is None  # neither pays its load: wait
    assert choose_stage(["c", "b"], {"b": 0, "c": 0}, {"b": 1.0, "c": 1.0}, {"b": 3.0, "c": 3.0}, 2) == "c"  # a tie: first ready
    # b wants 4 of 6 workers and has 3, c wants 2 and has none: c is further below its share
    assert choose_stage(["b", "c"], {"b": 3, "c": 0}, {"b": 1.0, "c": 1.0}, {"b": 8.0, "c": 4.0}, 6) == "c"


def test_a_stage_is_fed_while_each_model_stage_it_reads_with_shards_left_has_a_holder():
    from richpref.run.affinity import fed, model_feeders

    # c reads b through the model-free f (and the source, computed before); b reads a.
    feeders = model_feeders({"a": set(), "b": {"a"}, "f": {"b"}, "c": {"f"}}, {"a", "b", "c"})
    assert feeders == {"a": set(), "b": {"a"}, "c": {"b"}}
    assert not fed("c", feeders, {"a": 0.0, "b": 2.0, "c": 5.0}, {"a", "c"})  # nobody makes b: c's inputs stop
    assert fed("c", feeders, {"a": 0.0, "b": 2.0, "c": 5.0}, {"b"})
    assert fed("c", feeders, {"a": 0.0, "b": 0.0, "c": 5.0}, set())  # b is done: its outputs are all there
    assert fed("a", feeders, {"a": 1.0, "b": 2.0, "c": 5.0}, set())


def test_a_worker_does_not_wait_for_inputs_that_nobody_makes():
    # Two workers, the tiny profile on the built-in table: one took check early and waited for its
    # inputs while cutout, which makes them, had no holder (busy 0.484); now it goes on by the rule.
    from richpref.run.pipeline import _model_seconds, affinity_plan
    from richpref.schemas.config import load_profile
    from richpref.tasks import ALL_STAGES

    todo = [(i, st, s) for i, st in enumerate(ALL_STAGES) for s in range(16)]
    p = affinity_plan(todo, *_model_seconds(todo, load_profile("tiny"), DEFAULT_COSTS), 2)
    assert p.busy > 0.52, p.busy
