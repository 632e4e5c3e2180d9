"""The live dispatch of richpref/run/dispatch.py against a simulated cluster (tests/dispatch_sim.py). The
stage cost table the dispatch starts from is wrong on purpose."""
from __future__ import annotations

from dispatch_sim import Loaded, LoadFailed, Simulated, Stage
from pytest import approx


def _chain(shards: int):
    stages = [Stage("source", ()), Stage("a", ("source",)), Stage("b", ("a",)), Stage("c", ("b",)),
              Stage("export", ("c",), loads_model=False)]
    stages[0] = Stage("source", (), loads_model=False)
    return [(i, st, s) for i, st in enumerate(stages) for s in range(shards)]


def _dispatch(table_s, table_load, shards=16, workers=2, preload=True, load_result=Loaded, at_once=None, free_s=0.0):
    true_s, true_load = {"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 0.3, "b": 0.3, "c": 0.3}
    sim = Simulated(_chain(shards), true_s, true_load, [f"w{i}" for i in range(workers)], table_s, table_load, preload,
                     load_result, at_once, free_s)
    report = sim.run()
    return sim, report


def test_every_shard_runs_once_on_a_worker_and_model_free_ones_follow():
    sim, report = _dispatch({"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 0.3, "b": 0.3, "c": 0.3})
    ran = sorted(x for xs in sim.ran.values() for x in xs if not x.startswith("load"))
    assert ran == sorted(f"{st}{s}" for st in "abc" for s in range(16))
    stages = ("source", "a", "b", "c", "export")
    assert {k for k in sim.ends if k[0] != "load"} == {(st, s) for st in stages for s in range(16)}
    assert sum(report.shards.values()) == 48
    # Each shard is told finished once (to fetch its final state while the run goes on), loads not;
    # the last ones when the dispatch ends are left to the caller's final wait.
    told = sim.told_finished
    assert len(told) == len(set(told)) and all(k[0] != "load" for k in told)
    assert {("a", s) for s in range(16)} <= set(told) and len(told) >= 16 * 4


def _changes(ran: list[str]) -> int:
    stages = [x.split()[-1][0] for x in ran]
    return sum(a != b for a, b in zip(stages, stages[1:]))


def test_a_table_that_makes_loads_look_free_does_not_swap_models_back_and_forth():
    # The table says stage a's load takes 10 s, so one worker takes a and the other b, and that b's
    # and c's loads cost nothing (they take 0.3 s): switching to c whenever a shard of it is ready
    # looked free, and the worker holding b went b, c, b, c, ... as a's shards trickled in (5 to 6
    # changes of stage on one worker). Once the run has timed b's load, that worker leaves b only for
    # enough ready work.
    for preload in (False, True):
        sim, report = _dispatch({"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 10.0, "b": 0.0, "c": 0.0}, preload=preload)
        assert max(_changes(ran) for ran in sim.ran.values()) <= 3, sim.ran
        assert report.switches == sim.loads, sim.ran


def test_a_worker_idle_while_the_first_stage_computes_loads_the_next_stage_meanwhile():
    # Stage a's load (10 s in the table) is worth one worker only, which loads it at the start; the
    # other, idle, loads stage b's model meanwhile instead of waiting for a's first shard. (Once a's
    # load is timed at 0.3 s, that worker takes a's ready shards too.)
    with_preload, report = _dispatch({"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 10.0, "b": 0.3, "c": 0.3})
    without, _ = _dispatch({"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 10.0, "b": 0.3, "c": 0.3}, preload=False)
    assert report.preloads == 2 and sorted(ran[0] for ran in with_preload.ran.values()) == ["load a", "load b"]
    assert sorted(ran[0] for ran in without.ran.values()) == ["a0", "b0"], without.ran
    assert max(with_preload.ends.values()) <= max(without.ends.values())
    # a load ahead is timed from its submission to its end: the cluster's 0.3 s, not the table's
    assert list(with_preload.load_timed["a"]) == approx([0.3]) and with_preload.load("a") == approx(0.3)


def test_a_load_ahead_that_fails_is_reported_and_the_run_goes_on(caplog):
    # The shards of that stage load their models themselves and report what fails; the failed load is
    # no timing of the stage's load.
    sim, report = _dispatch({"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 10.0, "b": 0.3, "c": 0.3}, load_result=LoadFailed)
    assert report.preloads == 2 and sum(report.shards.values()) == 48
    assert list(sim.load_timed["a"]) == list(sim.load_timed["b"]) == []
    assert "loading b ahead on w1 failed: no such model directory" in caplog.text


def test_a_worker_gets_twice_as_many_shards_in_flight_of_a_stage_its_slot_runs_two_at_once():
    # A served VLM's stage claims half a GPU slot: its worker computes two shards at once, and a
    # third and fourth wait on it, so it never waits on the flow between shards.
    sim, _ = _dispatch({"a": 0.01, "b": 0.05, "c": 0.05}, {"a": 0.3, "b": 0.3, "c": 0.3}, workers=1, at_once={"b": 2})
    assert sim.most_in_flight == {"a": 2, "b": 4, "c": 2}, sim.most_in_flight


def test_the_first_model_stage_loads_while_its_inputs_are_computed():
    # The source shards take 0.5 s (CPU): the workers the rule gives stage a load its model (0.3 s)
    # meanwhile, so a's first shard ends at 0.5 + 0.2 s instead of 0.5 + 0.3 + 0.2 s. The table's
    # loads (0.3 s, 16 shards of 0.2 s) make a worth both workers.
    table_s, table_load = {"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 0.3, "b": 0.3, "c": 0.3}
    sim, report = _dispatch(table_s, table_load, free_s=0.5)
    without, _ = _dispatch(table_s, table_load, free_s=0.5, preload=False)
    assert [ran[0] for ran in sim.ran.values()] == ["load a", "load a"], sim.ran
    assert sim.ends[("a", 0)] == approx(0.7) and without.ends[("a", 0)] == approx(1.0)
    assert sorted(x for xs in sim.ran.values() for x in xs if not x.startswith("load")) == \
        sorted(f"{st}{s}" for st in "abc" for s in range(16))


def _long_then_short(preload: bool) -> tuple[int, Simulated]:
    """b's shards take 1 s, c's (fed by b) 0.4 s, on 4 workers: how many of c's shards end after b's last."""
    stages = [Stage("source", (), loads_model=False), Stage("a", ("source",)), Stage("b", ("a",)),
              Stage("c", ("b",))]
    todo = [(i, st, s) for i, st in enumerate(stages) for s in range(16)]
    true_s, loads = {"a": 0.05, "b": 1.0, "c": 0.4}, {"a": 0.3, "b": 0.3, "c": 0.3}
    sim = Simulated(todo, true_s, loads, [f"w{i}" for i in range(4)], true_s, loads, preload=preload)
    sim.run()
    assert sorted(x for xs in sim.ran.values() for x in xs if x.startswith("c")) == sorted(f"c{s}" for s in range(16))
    b_end = max(sim.ends[("b", s)] for s in range(16))
    return sum(sim.ends[("c", s)] > b_end for s in range(16)), sim


def test_the_last_holder_of_a_short_stage_fed_by_a_long_one_waits_for_its_inputs():
    # c's share of the 4 workers is more than one. The worker that loaded c ahead used to leave it
    # for b whenever c's ready shards ran out; b's shards are ready until b's end, so every worker
    # then kept b and c's 16 shards all ran after it. The last holder of c now waits for its inputs
    # while c's share is a whole worker.
    after_b, sim = _long_then_short(preload=True)
    assert after_b <= 6, (after_b, sim.ran)  # 8 when it left


def test_a_worker_leaves_a_long_stage_for_a_short_one_nobody_holds():
    # Nobody loads c ahead: every worker holds b, whose shards are ready until its end. One now
    # leaves b for c once c's ready shards pay the loads there and back.
    after_b, sim = _long_then_short(preload=False)
    assert after_b <= 8, (after_b, sim.ran)  # all 16 before; one holder of c cannot keep up with 3 of b


def test_a_stages_seconds_are_the_median_of_its_latest_timings():
    # The medians are over the latest TIMED timings: a cost that drifts is followed, and each median
    # sorts at most TIMED values (over every timing, the sorts grew with the run, quadratic in shards).
    from richpref.run.dispatch import TIMED

    sim = Simulated(_chain(1), {}, {}, ["w0"], {"a": 0.2, "b": 0.05, "c": 0.05}, {"a": 0.3, "b": 0.3, "c": 0.3})
    assert sim.seconds("a") == 0.2 and sim.load("a") == 0.3  # the table's, until timed
    sim.timed["a"].extend([1.0] * 300 + [2.0] * TIMED)
    sim.first["a"].extend([5.0] * 300 + [4.0] * TIMED)
    assert sim.seconds("a") == 2.0 and sim.load("a") == approx(2.0)
    assert len(sim.timed["a"]) == len(sim.first["a"]) == TIMED


def test_a_worker_does_not_wait_for_inputs_that_nobody_makes():
    # A chain a -> b -> c -> d on two workers, a's model slow to load: a worker holding d waited for
    # d's inputs while nobody held c, which makes them (busy 0.814); now it goes where the rule says.
    stages = [Stage("source", (), loads_model=False), Stage("a", ("source",)), Stage("b", ("a",)), Stage("c", ("b",)),
              Stage("d", ("c",)), Stage("export", ("d",), loads_model=False)]
    todo = [(i, st, s) for i, st in enumerate(stages) for s in range(16)]
    true_s, loads = {"a": 0.1, "b": 0.5, "c": 0.2, "d": 1.0}, {"a": 2.0, "b": 0.1, "c": 0.1, "d": 0.1}
    sim = Simulated(todo, true_s, loads, ["w0", "w1"], true_s, loads)
    sim.run()
    busy = sum(16 * s for s in true_s.values()) / (2 * max(sim.ends.values()))
    assert busy > 0.83, (busy, sim.ran)


def test_a_resumed_pass_starts_with_the_shards_whose_inputs_are_committed():
    # Stage a was committed by an earlier pass: b's shards read nothing computed in this one, so they
    # are ready at the start (before, they would wait for inputs that never finish).
    stages = [Stage("b", ("a",)), Stage("c", ("b",)), Stage("export", ("c",), loads_model=False)]
    todo = [(i, st, s) for i, st in enumerate(stages) for s in range(4)]
    sim = Simulated(todo, {"b": 0.05, "c": 0.05}, {"b": 0.3, "c": 0.3}, ["w0"], {"b": 0.05, "c": 0.05},
                    {"b": 0.3, "c": 0.3}, preload=False)
    report = sim.run()
    assert sum(report.shards.values()) == 8 and sim.ran["w0"][0] == "b0", sim.ran
    assert {k for k in sim.ends} == {(st.name, s) for st in stages for s in range(4)}


def test_a_stages_seconds_and_load_are_what_the_run_timed():
    # The table says every shard takes 1 s and every load 5 s; the cluster takes 0.05 s and 0.3 s. The
    # dispatch times each shard from its submission or its worker's previous shard, whichever is later:
    # a shard after one of its stage is its seconds alone, the first after another stage adds the load.
    sim, _ = _dispatch({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 5.0, "b": 5.0, "c": 5.0}, workers=1, preload=False)
    assert sim.seconds("b") == approx(0.05) and sim.seconds("c") == approx(0.05)
    assert sim.load("b") == approx(0.3) and sim.load("c") == approx(0.3)


def test_a_worker_idle_mid_run_loads_a_stage_nobody_holds_and_its_load_is_timed_from_then():
    # a's 8 shards take 1 s each; b and c are quick. The worker with no a shard left and b held by the
    # other loads c ahead (at 4.3 s, while a's last shards run); that load is timed from its
    # submission (1 s), not from the start of the run.
    stages = [Stage("source", (), loads_model=False), Stage("a", ("source",)), Stage("b", ("a",)), Stage("c", ("b",))]
    todo = [(i, st, s) for i, st in enumerate(stages) for s in range(8)]
    true_s, loads = {"a": 1.0, "b": 0.05, "c": 0.05}, {"a": 0.3, "b": 0.3, "c": 1.0}
    sim = Simulated(todo, true_s, loads, ["w0", "w1"], true_s, loads)
    sim.run()
    assert sum("load c" in ran for ran in sim.ran.values()) == 1 and list(sim.load_timed["c"]) == approx([1.0])
    assert sim.load("c") == approx(1.0)
