"""The curate flow end to end on the tiny profile: counts, format, caching, resume, config changes, and
the finetune deployment it launches once per set of pairs."""
from __future__ import annotations

import hashlib
import io
from uuid import UUID

import pyarrow as pa
import pytest
from PIL import Image

from richpref.run.storage import RunStore
from richpref.tasks import ALL_STAGES, OUTPUTS, PIPELINE

N_ITEMS, SHARD = 12, 4
OVERRIDES = ["source.limit=12", "source.shard_size=4"]


def curate_run(data_dir, run, models_root, extra=(), faults=None, monkeypatch=None):
    from richpref.ops.entrypoints import CURATE, load_flow

    curate = load_flow(CURATE)
    if faults and monkeypatch:
        monkeypatch.setenv("RICHPREF_FAULTS", faults)
    try:
        return curate(profile="tiny", run=run, data_dir=str(data_dir), overrides=[*OVERRIDES, *extra],
                      models_root=str(models_root))
    finally:
        if monkeypatch:
            monkeypatch.delenv("RICHPREF_FAULTS", raising=False)


def stages_from(first: str) -> list[str]:
    """The names of `first` and every stage after it, in pipeline order."""
    names = [s.name for s in ALL_STAGES]
    return names[names.index(first):]


def copy_run(runs_dir, src: str, dst: str, drop_from: str | None = None) -> RunStore:
    """A copy of run `src` as run `dst` without its work log; with `drop_from`, without that stage's
    output and every later one. A test that needs a run's early stages starts from the session's
    reference run this way instead of computing them again (their content keys match)."""
    import shutil

    store = RunStore(str(runs_dir), dst)
    shutil.copytree(RunStore(str(runs_dir), src).root, store.root)
    store.fs.rm(store.root + "/_log", recursive=True)
    if drop_from is not None:
        first = OUTPUTS.index(next(s.out for s in ALL_STAGES if s.name == drop_from))
        for out in OUTPUTS[first:]:
            store.fs.rm(f"{store.root}/{out}", recursive=True)
    return store


def work(data_dir, run):
    return [(r["stage"], r["shard"]) for r in RunStore(str(data_dir), run).read_log("work.jsonl")]


def pair_files(data_dir, run) -> dict[str, str]:
    store = RunStore(str(data_dir), run)
    return {f"part-{s:05d}": hashlib.sha256(open(store.shard_path("pairs", s), "rb").read()).hexdigest()
            for s in store.shards("pairs")}


def assert_every_row_accounted(runs_dir, run, num_edits=1):
    """At every stage and shard: one output row per kept input row (num_edits per item at the edit
    stage, keyed by candidate from there on), each kept or rejected with a reason."""
    store = RunStore(str(runs_dir), run)
    for stage in PIPELINE:
        driver = stage.reads[0]
        for s in store.shards(driver):
            inp = [r for r in store.read_shard(driver, s).to_pylist() if r.get("status", "ok") == "ok"]
            out = store.read_shard(stage.out, s).to_pylist()
            if stage.name == "edit":
                want = sorted((r["item_id"], c) for r in inp for c in range(num_edits))
            elif inp and "candidate" in inp[0]:
                want = sorted((r["item_id"], r["candidate"]) for r in inp)
            else:
                want = sorted(r["item_id"] for r in inp)
            got = sorted((r["item_id"], r["candidate"]) if "candidate" in r else r["item_id"] for r in out)
            if stage.out == "pairs":
                want, got = sorted(r["item_id"] for r in inp), sorted(r["item_id"] for r in out)
            assert got == want, (stage.name, s)
            for r in out:
                if "status" in r:
                    assert r["status"] in ("ok", "rejected")
                    assert (r["status"] == "ok") == (r["reason"] is None), r


def test_every_row_is_kept_or_rejected_at_every_stage(finished_run, runs_dir):
    store = RunStore(str(runs_dir), "ref")
    assert len(store.shards("source")) == N_ITEMS // SHARD
    assert store.read_stage("source").num_rows == N_ITEMS
    assert_every_row_accounted(runs_dir, "ref")


def test_pairs_are_pickapic_format_and_load_with_datasets(finished_run, runs_dir):
    import datasets

    store = RunStore(str(runs_dir), "ref")
    pairs = store.read_stage("pairs")
    assert pairs.num_rows > 0, "the tiny run should export some pairs"
    assert set(pairs.column("label_0").to_pylist()) <= {0, 1}
    relabel = {r["item_id"]: r for r in store.read_stage("relabel").to_pylist()}
    for r in pairs.to_pylist():
        for col in ("jpg_0", "jpg_1"):
            Image.open(io.BytesIO(r[col])).convert("RGB")
        assert r["label_0"] == (1 if relabel[r["item_id"]]["flipped"] else 0)
    ds = datasets.load_dataset("parquet", data_files=str(store.stage_dir("pairs")) + "/*.parquet", split="train")
    assert ds.num_rows == pairs.num_rows
    assert {"caption", "jpg_0", "jpg_1", "label_0"} <= set(ds.column_names)
    Image.open(io.BytesIO(ds[0]["jpg_0"]))


def test_each_shard_was_computed_once(finished_run, runs_dir):
    done = work(runs_dir, "ref")
    expected = [(s.name, k) for s in ALL_STAGES for k in range(N_ITEMS // SHARD)]
    assert sorted(done) == sorted(expected)


def test_each_stage_progress_artifact_ends_at_its_last_count(finished_run):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType
    from prefect.client.schemas.sorting import ArtifactSort

    found, page = [], None
    with get_client(sync_client=True) as client:
        while page is None or len(page) == 200:  # the session's other runs made progress artifacts too
            page = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
                                         sort=ArtifactSort.CREATED_DESC, limit=200, offset=len(found))
            found += page
    first = {a.description: a.data for a in found if (a.description or "").startswith("ref: ")}  # the oldest wins
    assert set(first) == {f"ref: {s.name} shards" for s in ALL_STAGES}
    assert {float(v) for v in first.values()} == {100.0}  # updates between shards are throttled; the last one is not


def test_second_run_executes_no_stage_work(finished_run, runs_dir, tiny_models):
    before = work(runs_dir, "ref")
    files = pair_files(runs_dir, "ref")
    again = curate_run(runs_dir, "ref", tiny_models)
    assert work(runs_dir, "ref") == before
    assert pair_files(runs_dir, "ref") == files
    assert again["stages"] == finished_run["stages"]


def test_resume_after_a_failed_shard_redoes_only_that_shard(finished_run, runs_dir, tiny_models, monkeypatch):
    from richpref.run.runner import CurateFailed

    # source .. filter as the reference run has them; the shard fails in score, a stage with models loaded
    copy_run(runs_dir, "ref", "crash", drop_from="score")
    with pytest.raises(CurateFailed, match=r"score/part-00001"):
        curate_run(runs_dir, "crash", tiny_models, faults="score:1:raise", monkeypatch=monkeypatch)
    first = work(runs_dir, "crash")
    assert {name for name, _ in first} == set(stages_from("score"))
    assert ("score", 1) not in first
    assert ("export", 0) in first and ("export", 2) in first  # the other shards went all the way
    curate_run(runs_dir, "crash", tiny_models)
    redone = work(runs_dir, "crash")[len(first):]
    downstream = [s.name for s in PIPELINE[PIPELINE.index(next(p for p in PIPELINE if p.name == "score")):]]
    assert sorted(redone) == sorted((name, 1) for name in downstream)
    assert pair_files(runs_dir, "crash") == pair_files(runs_dir, "ref")


def test_config_change_recomputes_that_stage_and_later_only(finished_run, runs_dir, tiny_models):
    import shutil

    store = RunStore(str(runs_dir), "ref")
    shutil.copytree(store.root, RunStore(str(runs_dir), "cfg").root)
    RunStore(str(runs_dir), "cfg").fs.rm(RunStore(str(runs_dir), "cfg").root + "/_log", recursive=True)
    # a threshold of the relabel stage: the scores (and every earlier stage) stay, relabel and export redo
    curate_run(runs_dir, "cfg", tiny_models, extra=["relabel.min_margin=0.5"])
    assert sorted(work(runs_dir, "cfg")) == sorted((name, k) for name in stages_from("relabel") for k in range(3))


def test_a_deleted_output_shard_is_recomputed_not_served_from_cache(finished_run, runs_dir, tiny_models):
    store = RunStore(str(runs_dir), "ref")
    before = pair_files(runs_dir, "ref")
    store.fs.rm(store.shard_path("critique", 2))
    n = len(work(runs_dir, "ref"))
    curate_run(runs_dir, "ref", tiny_models)
    assert ("critique", 2) in work(runs_dir, "ref")[n:]
    assert pair_files(runs_dir, "ref") == before


def test_several_edits_per_item_paired_best_against_worst(finished_run, runs_dir, tiny_models):
    """num_edits=2 on a copy of the reference run: edit and every later stage recompute, nothing
    before; every candidate is accounted for; each pair's images are the candidates it names."""
    import shutil

    ref = RunStore(str(runs_dir), "ref")
    store = RunStore(str(runs_dir), "multi")
    shutil.copytree(ref.root, store.root)
    store.fs.rm(store.root + "/_log", recursive=True)
    curate_run(runs_dir, "multi", tiny_models, extra=["edit.num_edits=2", "relabel.pairing=best_vs_worst"])
    assert {name for name, _ in work(runs_dir, "multi")} == set(stages_from("edit"))
    assert_every_row_accounted(runs_dir, "multi", num_edits=2)

    edits = {(r["item_id"], r["candidate"]): r for r in store.read_stage("edit").to_pylist()}
    assert len(edits) == 2 * ref.read_stage("edit").num_rows
    ref_edits = {r["item_id"]: r for r in ref.read_stage("edit").to_pylist()}
    for (iid, c), r in edits.items():  # candidate 0 is the one-edit run's edit (same seed)
        if c == 0:
            assert r["seed"] == ref_edits[iid]["seed"]
        else:
            assert r["seed"] != ref_edits[iid]["seed"]
    samples = {r["item_id"]: r["image"] for r in store.read_stage("sample").to_pylist()}
    relabel = {(r["item_id"], r["candidate"]): r for r in store.read_stage("relabel").to_pylist()}
    kept = [r for r in relabel.values() if r["status"] == "ok"]
    pairs = store.read_stage("pairs").to_pylist()
    assert pairs and len(pairs) == len(kept) == len({r["item_id"] for r in kept})  # at most one pair per item
    for p in pairs:
        r = relabel[p["item_id"], p["candidate_1"]]
        assert (r["candidate_0"], r["candidate_1"]) == (p["candidate_0"], p["candidate_1"])
        assert p["candidate_0"] < p["candidate_1"]
        jpg_0 = samples[p["item_id"]] if p["candidate_0"] == -1 else edits[p["item_id"], p["candidate_0"]]["image"]
        assert p["jpg_0"] == jpg_0 and p["jpg_1"] == edits[p["item_id"], p["candidate_1"]]["image"]
        assert p["label_0"] == (1 if r["chosen"] == 0 else 0)
        others = [v for (iid, c), v in relabel.items() if iid == p["item_id"] and c != p["candidate_1"]]
        assert all(v["status"] == "rejected" for v in others)
        # best against worst: no image of the item scores outside the pair's composites
        lo, hi = sorted((r["composite_0"], r["composite_1"]))
        for v in others:
            if v["reason"].startswith("not_selected"):
                assert lo - 1e-9 <= v["composite_1"] <= hi + 1e-9

    from richpref.views.inspect import connect, summary

    with_original = [r for r in kept if r["candidate_0"] == -1]  # pairs of two edits cannot flip
    assert summary(str(runs_dir), "multi")["flip_rate"] == pytest.approx(
        sum(r["flipped"] for r in with_original) / len(with_original))
    assert not any(r["flipped"] for r in kept if r["candidate_0"] >= 0)
    con, _ = connect(str(runs_dir), "multi")
    n, items, in_pair = con.execute("select count(*), count(distinct item_id), count(*) filter (where in_pair) "
                                    "from pairs_full").fetchone()
    assert items == N_ITEMS and n == N_ITEMS + sum(1 for (i, c) in edits if c == 1)
    assert in_pair == sum(2 if p["candidate_0"] >= 0 else 1 for p in pairs)


def test_cli_returns_at_once_for_an_up_to_date_run_and_plans_the_rest(finished_run, runs_dir, tiny_models,
                                                                      monkeypatch, capsys):
    import shutil

    import richpref.ops.entrypoints as entrypoints
    from richpref.cli.commands import main

    ref = RunStore(str(runs_dir), "ref")
    store = RunStore(str(runs_dir), "planned")
    shutil.copytree(ref.root, store.root)
    argv = ["--data-dir", str(runs_dir), "curate", "--run", "planned", "--models-root", str(tiny_models),
            *(x for o in OVERRIDES for x in ("--set", o))]

    def no_flow(*a, **k):
        raise AssertionError("an up-to-date run must not start the flow")

    monkeypatch.setattr(entrypoints, "load_flow", lambda entrypoint: no_flow)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "up to date, nothing to compute" in out and "flip rate" in out and "pairs (Pick-a-Pic format)" in out
    # killed after its last shard but before it wrote its final state: the flow must finish the run
    import json

    run_json = store.root + "/run.json"
    final = store.fs.cat_file(run_json)
    store.fs.pipe_file(run_json, json.dumps({**json.loads(final), "state": "running"}).encode())
    with pytest.raises(AssertionError, match="must not start"):
        main(argv)
    store.fs.pipe_file(run_json, final)

    # a lost critique shard file: that shard is to do, for the key it had. A key follows its inputs' keys,
    # so the shards made from it keep theirs: nothing after it is redone (before: all were planned as
    # blocked, and status called them stale, "committed for another config or richpref version")
    store.fs.rm(store.shard_path("critique", 1))
    assert main([*argv, "--plan"]) == 0
    lines = {ln.split()[0]: ln.split()[1:4] for ln in capsys.readouterr().out.splitlines()[2:]}
    assert lines["sample"] == ["3", "0", "0"] and lines["critique"] == ["2", "1", "0"]
    for later in stages_from("instruct"):
        assert lines[ALL_STAGES[[s.name for s in ALL_STAGES].index(later)].out] == ["3", "0", "0"], later
    assert main(["--data-dir", str(runs_dir), "status", "planned"]) == 0
    rows = {r[0]: r[1:] for r in map(str.split, capsys.readouterr().out.splitlines()[2:]) if len(r) == 5}
    assert list(rows) == list(lines)  # named as --plan names them (before: `export` there, `pairs` here)
    assert rows.pop("critique") == ["2", "0", "1", "0"] and set(map(tuple, rows.values())) == {("3", "0", "0", "0")}
    # a changed edit config: edit and later are to do (or blocked), nothing before
    assert main([*argv, "--set", "edit.strength=0.5", "--plan"]) == 0
    lines = {ln.split()[0]: ln.split()[1:4] for ln in capsys.readouterr().out.splitlines()[2:]}
    assert lines["instruct"][1] == "0" and lines["edit"][1] == "2" and lines["cutout"][1] == "0"
    with pytest.raises(AssertionError, match="must not start"):  # not up to date: the flow is started
        main(argv)


def test_the_flow_refuses_a_missing_model_of_a_stage_with_work_before_its_first_shard(finished_run, runs_dir,
                                                                                      tiny_models, tmp_path):
    # a deployment runs the flow without the command's checks: before, source and sample ran, then every
    # critique shard failed on the model
    from richpref.doctor.checks import ModelProblem

    models = tmp_path / "models"  # the tiny models but the critic
    models.mkdir()
    for m in tiny_models.iterdir():
        if m.name != "llava-critic":
            (models / m.name).symlink_to(m)
    with pytest.raises(ModelProblem, match="critique: model 'llava-critic'"):
        curate_run(tmp_path, "new", models)
    assert not RunStore(str(tmp_path), "new").shards("source")
    copy_run(runs_dir, "ref", "critiqued")  # a run whose critiques are done needs no critic to finish
    assert curate_run(runs_dir, "critiqued", models)["state"] == "completed"


def test_until_stops_after_that_stage_and_a_later_run_continues(finished_run, runs_dir, tiny_models, capsys):
    import json
    import shutil

    import richpref.ops.entrypoints as entrypoints
    from richpref.cli.commands import main

    def no_flow(*a, **k):
        raise AssertionError("an up-to-date run must not start the flow")

    def until(stage: str, *extra: str) -> str:
        """`richpref curate --until stage` on the run, where starting the flow fails: what it printed."""
        argv = ["--data-dir", str(runs_dir), "curate", "--run", "until", "--models-root", str(tiny_models),
                *(x for o in OVERRIDES for x in ("--set", o)), "--until", stage, *extra]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(entrypoints, "load_flow", lambda entrypoint: no_flow)
            assert main(argv) == 0
        return capsys.readouterr().out

    store = RunStore(str(runs_dir), "until")
    shutil.copytree(RunStore(str(runs_dir), "ref").root, store.root)
    store.fs.rm(store.root + "/_log", recursive=True)
    for out in OUTPUTS[OUTPUTS.index("critique"):]:
        store.fs.rm(store.shard_path(out, 1))
    from richpref.ops.entrypoints import CURATE, load_flow

    load_flow(CURATE)(profile="tiny", run="until", data_dir=str(runs_dir), overrides=OVERRIDES, models_root=str(tiny_models),
           until="instruct")
    assert work(runs_dir, "until") == [("critique", 1), ("instruct", 1)]
    assert json.loads(store.fs.cat_file(store.root + "/run.json"))["state"] == "stopped after instruct"
    assert 1 not in store.shards("edit")
    # The same command again, or an earlier --until, has nothing to compute: no Prefect, no flow.
    assert "stopped after instruct (--until); run the same command without --until" in until("instruct")
    assert "up to date, nothing to compute" in until("critique")
    with pytest.raises(AssertionError, match="must not start"):  # edit's shard 1 is to do
        until("edit")
    planned = [ln.split()[0] for ln in until("edit", "--plan").splitlines()[2:]]
    assert planned == ["source", "sample", "critique", "instruct", "edit"]  # the stages this command computes
    curate_run(runs_dir, "until", tiny_models)
    assert sorted(work(runs_dir, "until")[2:]) == sorted((s, 1) for s in stages_from("edit"))
    assert pair_files(runs_dir, "until") == pair_files(runs_dir, "ref")
    out = until("edit")  # a completed run covers every stage, and its record stays the whole run's
    assert "up to date, nothing to compute" in out and "pairs (Pick-a-Pic format)" in out
    assert "up to date, nothing to compute" in until("pairs")  # the export stage's table: the whole run
    assert json.loads(store.fs.cat_file(store.root + "/run.json"))["state"] == "completed"


# --- launching the finetune deployment from curate -------------------------------------------------

def test_curate_launches_the_finetune_deployment_once_per_pairs(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.finetune import finetune
    from flows.launch import launch_finetune, pairs_key
    from richpref.schemas.training import load_finetune_config
    from richpref.training.finetune import default_output_dir
    from richpref.run.runner import write_shard
    from richpref.run.storage import RunStore

    finetune.to_deployment(name="tiny-test").apply()
    store = RunStore(str(tmp_path / "data"), "demo")
    table = pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [1]})
    manifest = write_shard(store, "pairs", 0, table, "k1")
    summary = {"run": "demo", "pairs": store.uri(store.stage_dir("pairs")), "manifests": {"pairs": [manifest.to_dict()]}}

    tiny = load_finetune_config("finetune-tiny")
    assert default_output_dir(tiny, "data") == "data/finetune/finetune-tiny"  # `richpref finetune`: by config
    first = launch_finetune(summary, "finetune/tiny-test")
    assert launch_finetune(summary, "finetune/tiny-test") == first  # a retried curate run: same flow run
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(first))
    assert run.parameters["pairs"] == summary["pairs"] and run.parameters["pairs_key"] == pairs_key(summary)

    changed = write_shard(store, "pairs", 0, table.set_column(0, "caption", pa.array(["b"])), "k1")
    changed_summary = {**summary, "manifests": {"pairs": [changed.to_dict()]}}
    other = launch_finetune(changed_summary, "finetune/tiny-test")
    assert other != first
    # each set of pairs trains its own model (one folder refuses the pairs it did not train on)
    for s in (summary, changed_summary):
        assert default_output_dir(tiny, "data", pairs_key(s)) == f"data/finetune/finetune-tiny-{pairs_key(s)[:12]}"
    empty = {**summary, "manifests": {"pairs": [{**manifest.to_dict(), "kept": 0}]}}
    assert launch_finetune(empty, "finetune/tiny-test") is None
