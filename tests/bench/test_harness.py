"""The benchmark harness's pure parts (median, spread, alternation, ratios, goals, the result record's
keys) and the doc generator (bench/report.py): no benchmark runs here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
import report  # noqa: E402


def test_median_and_spread():
    assert harness.median([3.0, 1.0, 2.0]) == 2.0
    assert harness.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert harness.spread([3.0, 1.0, 2.0]) == (1.0, 3.0)
    with pytest.raises(ValueError):
        harness.median([])


def test_alternation_rotates_sides_so_each_runs_first_in_turn():
    assert harness.alternation(["a", "b"], 3) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    order = harness.alternation(["a", "b", "c"], 3)
    firsts = [order[i * 3][1] for i in range(3)]
    assert firsts == ["a", "b", "c"]
    assert sorted(s for _, s in order) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3


def test_summary_per_side_and_ratios_per_repeat():
    runs = [{"side": "a", "repeat": 0, "wall_s": 10.0, "ok": True}, {"side": "b", "repeat": 0, "wall_s": 5.0},
            {"side": "b", "repeat": 1, "wall_s": 4.0}, {"side": "a", "repeat": 1, "wall_s": 12.0}]
    s = harness.summarize(runs)
    assert s["a.wall_s"] == {"median": 11.0, "min": 10.0, "max": 12.0, "n": 2}
    assert "a.ok" not in s  # booleans are not figures
    r = harness.ratios(runs, ("a", "wall_s"), ("b", "wall_s"), "ratio")
    assert [x["ratio"] for x in r] == [2.0, 3.0]
    assert harness.summarize(r)["ratio"]["median"] == 2.5


def test_goal_met():
    assert harness.goal_met(1.1, "<= 1.15") is True
    assert harness.goal_met(1.2, "<= 1.15") is False
    assert harness.goal_met(3.8, ">= 3") is True
    assert harness.goal_met(None, "<= 1") is None
    assert harness.goal_met(1.0, None) is None


def test_result_record_has_exactly_the_shared_keys(tmp_path):
    b = harness.Bench("demo", repeats=2, command="python bench/demo.py", results_dir=tmp_path)
    b.alternate(["a", "b"], lambda side, rep: {"wall_s": 1.0 + rep + (side == "b")})
    path = b.write(harness.headline("a.wall_s", 1.5, "s", "<= 2"))
    b.cleanup()
    rec = json.loads(path.read_text())
    assert tuple(rec) == harness.KEYS
    assert path.name == f"demo-{rec['commit']}.json"
    assert {"cpus", "loadavg"} <= set(rec["machine"])
    assert rec["repeats"] == 2 and [r["side"] for r in rec["runs"]] == ["a", "b", "b", "a"]
    assert rec["summary"]["a.wall_s"]["median"] == 1.5
    assert rec["headline"] == {"name": "a.wall_s", "value": 1.5, "unit": "s", "goal": "<= 2", "met": True}


def _rec(bench, date, value, met):
    return harness.result(bench, "abc1234", {"cpus": 2, "loadavg": [3.0, 2.0, 1.0]}, f"python bench/{bench}.py",
                          3, [{"side": "a", "repeat": i, "x": value + i} for i in range(3)],
                          harness.headline("x", value + 1, "s", "<= 2"), date=date)


def test_report_uses_newest_file_per_bench_and_keeps_prose(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "one-old.json").write_text(json.dumps(_rec("one", "2026-01-01T00:00:00+00:00", 5.0, False)))
    (res / "one-new.json").write_text(json.dumps(_rec("one", "2026-02-01T00:00:00+00:00", 0.5, True)))
    (res / "two-x.json").write_text(json.dumps(_rec("two", "2026-02-01T00:00:00+00:00", 3.0, False)))
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nIntro.\n\n## Prose kept\n\nText.\n")
    assert report.main(["--results", str(res), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nIntro.\n\n" + report.BEGIN) and text.endswith("## Prose kept\n\nText.\n")
    rows = [l for l in text.splitlines() if l.startswith("| one ") or l.startswith("| two ")]
    assert len(rows) == 2
    assert "1.500 s | <= 2 | **met** | 3 | 1.500 (0.500 – 2.500) | abc1234" in rows[0]
    assert "**not met**" in rows[1] and "under load" in rows[1]
    assert report.main(["--results", str(res), "--doc", str(doc), "--check"]) == 0
    # a second generation replaces the block, it does not add one
    (res / "two-x.json").unlink()
    report.main(["--results", str(res), "--doc", str(doc)])
    text = doc.read_text()
    assert text.count(report.BEGIN) == 1 and "| two " not in text and "## Prose kept" in text


def _guards_bench():
    import importlib.util

    if "instruction_guards_bench" in sys.modules:
        return sys.modules["instruction_guards_bench"]
    spec = importlib.util.spec_from_file_location("instruction_guards_bench", ROOT / "bench" / "instruction_guards.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_instruction_guard_scores_wilson_intervals_and_unparsed_apart():
    g = _guards_bench()
    lo, hi = g.wilson(8, 10)  # by hand: centre 0.71674, half-width 0.18441
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert g.wilson(0, 0) == (0.0, 1.0)
    D = g.Decision
    ds = [D("e", "a", "keep", "keep", "x"), D("e", "b", "stray_content", "ungrounded", "x"),
          D("e", "c", "keep", "unparsed", "x"), D("e", "d", "commentary", "unparsed", "x")]
    s = g.scores(ds)
    assert (s["tp"], s["fp"], s["fn"], s["tn"], s["unparsed"], s["n"]) == (1, 0, 0, 1, 2, 2)


def test_the_held_out_set_is_the_frozen_one():
    g = _guards_bench()
    corpus = g.frozen_heldout()
    assert sum(len(e["instructions"]) for e in corpus) >= 100
    assert {e["split"] for e in corpus} == {"held_out_2"}


def test_memory_slope_is_least_squares_in_units_per_item():
    import curate_runs

    assert curate_runs.slope([4, 8, 16], [100.0, 104.0, 112.0]) == pytest.approx(1.0)
    assert curate_runs.slope([8, 8], [1.0, 2.0]) == 0.0


def test_source_bytes_needed_are_the_row_groups_holding_the_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import source_stream

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": list(range(100))}), path, row_group_size=10)
    md = pq.ParquetFile(path).metadata
    rg = lambda i: md.row_group(i).column(0).total_compressed_size  # noqa: E731
    assert source_stream.needed_mb(path, 10) * 1e6 == md.serialized_size + rg(0)
    assert source_stream.needed_mb(path, 11) * 1e6 == md.serialized_size + rg(0) + rg(1)


def test_goal_in_a_range():
    assert harness.goal_met(0.86, "in [0.75, 1.25]") is True
    assert harness.goal_met(1.3, "in [0.75, 1.25]") is False
    assert harness.goal_met(0.7, "in [0.75, 1.25]") is False
    assert harness.goal_met(1.0, "in [a, b]") is None


def test_rate_ratios_last_side_over_first_and_the_worst():
    res = {"b1": {"x.items_per_s": 2.0, "y.items_per_s": 4.0, "x.other": 1.0},
           "b8": {"x.items_per_s": 8.0, "y.items_per_s": 6.0}}
    r = harness.rate_ratios(res, ["b1", "b8"], "items_per_s")
    assert r == {"x.speedup": 4.0, "y.speedup": 1.5, "worst_speedup": 1.5}


def test_child_argv_drops_repeats():
    assert harness.child_argv(["--n", "4", "--repeats", "2", "--x"]) == ["--n", "4", "--x"]
    assert harness.child_argv(["--repeats=3", "--n", "4"]) == ["--n", "4"]


CHILD = '''
import argparse, os, sys
sys.path.insert(0, {bench!r})
import harness
ap = harness.child_args(argparse.ArgumentParser(), repeats=2)
ap.add_argument("--n", type=int)
a = ap.parse_args()
assert a.child and a.repeats == 2 and a.n == 4
# each side's figure: its position in this process's order, and whether the process had a fresh Prefect home
harness.print_child("RESULT ", {{s: {{"pos": float(i), "fresh": float("richpref-bench-" in os.environ["PREFECT_HOME"])}}
                                for i, s in enumerate(a.order)}})
'''


def test_per_repeat_runs_a_fresh_process_per_repeat_with_the_sides_rotated(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(bench=str(ROOT / "bench")))
    b = harness.Bench("demo", repeats=2, command="python child.py", results_dir=tmp_path)
    b.per_repeat(str(script), ["--n", "4"], ["a", "b"], derive=lambda res: {"d": res["b"]["pos"] - res["a"]["pos"]},
                 timeout=60)
    b.cleanup()
    by = {(r["side"], r["repeat"]): r for r in b.runs}
    assert by[("a", 0)]["pos"] == 0 and by[("b", 0)]["pos"] == 1  # repeat 0: a then b
    assert by[("b", 1)]["pos"] == 0 and by[("a", 1)]["pos"] == 1  # repeat 1: b then a
    assert all(r["fresh"] == 1.0 for r in b.runs if r["side"] in "ab")
    assert [by[("derived", i)]["d"] for i in (0, 1)] == [1.0, -1.0]
    assert by[("process", 0)]["wall_s"] > 0 and "cpu_s" in by[("process", 1)]
    s = harness.summarize(b.runs)
    assert s["a.pos"]["n"] == 2 and s["d"]["median"] == 0.0 and "process.wall_s" in s


def test_a_failing_child_raises_with_its_stderr(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("import sys; sys.exit('broken on purpose')")
    b = harness.Bench("demo", repeats=1, results_dir=tmp_path)
    with pytest.raises(RuntimeError, match="broken on purpose"):
        b.per_repeat(str(script), [], ["a"], timeout=60)
    b.cleanup()


def test_run_writes_the_record_with_the_headline_from_the_summary_and_removes_its_folder(tmp_path):
    folders = []

    def side(b, name, rep):
        root, env = b.fresh(f"{name}{rep}")
        folders.append(root)
        return {"wall_s": {"a": 2.0, "b": 1.0}[name] * (1 + rep)}

    rec = harness.run("demo", 3, ["a", "b"], "speedup", "x", ">= 2", side=side,
                      extra_runs=lambda runs: harness.ratios(runs, ("a", "wall_s"), ("b", "wall_s"), "speedup"),
                      results_dir=tmp_path, note=lambda s: f"a median {s['a.wall_s']['median']:.0f} s")
    assert tuple(rec) == harness.KEYS and rec["repeats"] == 3
    assert [(r["repeat"], r["side"]) for r in rec["runs"][:6]] == harness.alternation(["a", "b"], 3)
    assert rec["headline"] == {"name": "speedup", "value": 2.0, "unit": "x", "goal": ">= 2", "met": True,
                               "note": "a median 4 s"}
    assert rec["summary"]["speedup"]["n"] == 3 and rec["summary"]["a.wall_s"]["max"] == 6.0
    assert json.loads((tmp_path / f"demo-{rec['commit']}.json").read_text()) == rec
    assert folders and not any(f.exists() for f in folders)  # the bench's temp folder is gone


def test_run_per_repeat_and_a_headline_metric_chosen_from_the_summary(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(bench=str(ROOT / "bench")))
    rec = harness.run("demo", 2, ["a", "b"], lambda s: max(("a.pos", "b.pos"), key=lambda k: s[k]["max"]), "",
                      script=str(script), args=["--n", "4"], derive=lambda res: {"d": res["b"]["pos"] - res["a"]["pos"]},
                      timeout=60, results_dir=tmp_path)
    assert rec["headline"]["name"] in ("a.pos", "b.pos") and rec["headline"]["value"] == 0.5
    assert {r["side"] for r in rec["runs"]} == {"a", "b", "derived", "process"}
    with pytest.raises(ValueError):
        harness.run("demo", 1, ["a"], "x", "", results_dir=tmp_path)  # neither a script nor a side


def test_report_quick_table_sums_benchmarks_and_lists_the_skipped(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    m = {"cpus": 2, "loadavg": [1.0, 1.0, 1.0]}
    whole = harness.result("run_all_quick", "abc1234", m, "python bench/run_all.py --quick", 1,
                           [{"side": "one", "repeat": 0, "wall_s": 10.0, "cpu_s": 8.0, "rc": 0},
                            {"side": "two", "repeat": 0, "wall_s": 20.0, "cpu_s": 15.0, "rc": 0},
                            {"side": "total", "repeat": 0, "wall_s": 30.0, "cpu_s": 23.0}],
                           harness.headline("total.wall_s", 30.0, "s", "< 900", skipped={"gpu": "needs a CUDA GPU"}),
                           date="2026-01-01T00:00:00+00:00")
    part = harness.result("run_all_quick_partial_two", "abc1234", m, "python bench/run_all.py --quick --only two", 1,
                          [{"side": "two", "repeat": 0, "wall_s": 5.0, "cpu_s": 4.0, "rc": 0, "load_before": 3.0,
                            "load_after": 4.0}, {"side": "one", "repeat": 0, "wall_s": 1.0, "cpu_s": 1.0, "rc": 1},
                           {"side": "total", "repeat": 0, "wall_s": 6.0, "cpu_s": 5.0}],
                          harness.headline("total.wall_s", 5.0, "s", None, skipped={}), date="2026-02-01T00:00:00+00:00")
    older = harness.result("run_all_quick", "0ld0000", m, "python bench/run_all.py --quick", 1,
                           [{"side": "gone", "repeat": 0, "wall_s": 7.0, "cpu_s": 7.0, "rc": 0}],
                           harness.headline("total.wall_s", 7.0, "s", "< 900", skipped={}), date="2025-12-01T00:00:00+00:00")
    (res / "run_all_quick-0ld0000.json").write_text(json.dumps(older))
    (res / "run_all_quick-abc1234.json").write_text(json.dumps(whole))
    (res / "run_all_quick_partial_two-abc1234.json").write_text(json.dumps(part))
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\nIntro.\n\nProse.\n")
    assert report.main(["--results", str(res), "--doc", str(doc)]) == 0
    text = doc.read_text()
    rows = [l for l in text.splitlines() if l.startswith("| ")]
    assert not any(l.startswith("| run_all_quick_partial") for l in rows)  # not a headline row
    assert "| two | 5 | 4 | 0 | 3.0 → 4.0 |" in text  # the newer (partial) figure
    assert "| one | 10 | 8 | 0 |" in text  # a later failed run does not hide the success
    assert "| **sum** | **15** | **12** |" in text and "| gone |" not in text  # not in the newest whole run
    assert "- `editor_cost`: needs a CUDA GPU" in text and "- `workers`: too slow for the quick set" in text
    assert report.main(["--results", str(res), "--doc", str(doc), "--check"]) == 0


def test_run_all_lists_every_benchmark_in_bench_with_a_command_or_a_reason():
    import run_all

    helpers = {"harness.py", "report.py", "run_all.py", "timing.py", "gpu_check_record.py"}
    scripts = {p.name for p in (ROOT / "bench").iterdir() if p.suffix in (".py", ".sh")} - helpers
    for quick in (True, False):
        jobs = run_all.plan(quick, "/models", "/diffusers")
        listed = {Path(a).name for _, args, _ in jobs for a in args[:1]}
        assert scripts <= listed, f"not in run_all.py: {sorted(scripts - listed)}"
        assert len({n for n, _, _ in jobs}) == len(jobs)
    skipped = {n: why for n, _, why in run_all.plan(True, "/models", "/diffusers") if why}
    assert set(skipped) >= {"editor_cost", "gpu_check", "demo_budget"} and all(len(w) > 20 for w in skipped.values())
    assert not any(why for _, _, why in run_all.plan(False, "/models", "/diffusers") if why and "GPU" not in why)


def test_under_load_is_other_processes_cpu_not_the_benchmarks_own():
    start = {"t": 0.0, "busy_s": 100.0, "own_s": 10.0}
    # 10 s on 2 cores: 12 s busy in all, 10 of them the benchmark's own -> others kept 10% of the machine
    alone = harness.others_share(start, {"t": 10.0, "busy_s": 112.0, "own_s": 20.0}, 2)
    shared = harness.others_share(start, {"t": 10.0, "busy_s": 118.0, "own_s": 20.0}, 2)
    assert alone == pytest.approx(0.1) and shared == pytest.approx(0.4)
    loaded_by_itself = {"cpus": 2, "loadavg": [1.9], "loadavg_after": [2.0]}
    assert not harness.under_load({**loaded_by_itself, "others_cpu_share": alone})
    assert harness.under_load({**loaded_by_itself, "others_cpu_share": shared})
    assert harness.under_load(loaded_by_itself)  # no measure: the load average decides, as before
    assert harness.others_share(None, start, 2) is None
    now = harness.cpu_seconds()
    assert now is None or (now["busy_s"] > 0 and now["own_s"] > 0)


def test_the_schedule_bench_splits_a_workers_slot_time_as_its_trace_says():
    import schedule

    trace = ["1 load a 0.0 1.0", "1 compute a 1.5 2.0", "1 compute a 2.25 3.0", "1 load b 3.5 4.0",
             "1 compute b 4.0 5.0", "1 compute b 5.25 5.5", "2 compute b 1.0 2.0", "2 compute b 2.5 3.0",
             "2 compute c 3.5 4.0"]
    got, by_stage = schedule.idle_breakdown(trace, start=0.0, end=6.0)
    # worker 1: computes 2.5, loads 1.5, head 0, gaps 0.5 (load -> a) + 0.25 (a -> a) + 0.5 (a -> load
    # b) + 0 (load -> b) + 0.25 (b -> b), tail 0.5; worker 2: computes 2.0, head 1.0, gaps 0.5 (b -> b)
    # + 0.5 (b -> c), tail 2.0
    assert got == pytest.approx({"compute": 2.5 + 2.0, "load": 1.5, "gap_same_model": 0.25 + 0.25 + 0.5,
                                 "gap_switch": 1.0 + 0.5, "head": 1.0, "tail": 2.5})
    assert by_stage == pytest.approx({"a": 0.25, "b": 0.75})


def test_the_schedule_bench_sleeps_a_workers_start_once_before_its_first_load(tmp_path, monkeypatch):
    import schedule

    from richpref.models.runtime import resident

    trace = tmp_path / "trace.txt"
    monkeypatch.setenv(schedule.TRACE_ENV, str(trace))
    monkeypatch.setenv(schedule.STARTED_ENV, "")  # not started; set back when the test ends
    resident.release()
    try:
        for name in ("a", "b", "a"):
            schedule._sleeping_load(name, 0.01, 0.05)(None)
    finally:
        resident.release()
    events = [line.split()[1:3] for line in trace.read_text().splitlines()]
    assert events == [["load", "start"], ["load", "a"], ["load", "b"], ["load", "a"]]
    t0, t1 = map(float, trace.read_text().splitlines()[0].split()[3:])
    assert t1 - t0 >= 0.05
