"""The rebuild pipeline (`pipeline: rebuild`) on tiny real models: prompts -> N seeded samples ->
rewards -> ranked pairs -> Pick-a-Pic. One small run per module (2 shards, 3 samples per prompt),
failed at its rewards shard 1 and resumed, shared by every test here."""
from __future__ import annotations

import io
import json
import re
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from relabel_helpers import card_images_uploaded
from richpref.common.faults import InjectedFault
from richpref.recipes.inline import run_inline
from richpref.schemas.config import ProfileError, load_profile
from richpref.schemas.tables import OK, sample_scores_schema, rows_to_table
from richpref.run.storage import RunStore
from richpref.tasks.rebuild_pair import pair_index, rank_items
from richpref.tasks.rebuild_sample import sample_seed

N = 3
# Rows 0-7 of the bundled file: 6 distinct captions (two repeated), 2 shards of 4 rows.
OVERRIDES = ["source.limit=8", "source.shard_size=4", f"sample.num_samples={N}", "relabel.min_margin=0.3"]


def profile(models, *extra):
    return load_profile("tiny-rebuild", OVERRIDES + list(extra), models_root=str(models))


@pytest.fixture(scope="module")
def rebuilt(tiny_models, tmp_path_factory, monkeypatch_module):
    data = str(tmp_path_factory.mktemp("rebuild"))
    prof = profile(tiny_models)
    monkeypatch_module.setenv("RICHPREF_FAULTS", "rewards:1:raise")
    with pytest.raises(InjectedFault):
        run_inline(prof, data, "r")
    monkeypatch_module.delenv("RICHPREF_FAULTS")
    manifests = run_inline(prof, data, "r")
    return data, RunStore(data, "r"), prof, manifests


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def read(store, out):
    return pa.concat_tables([store.read_shard(out, s) for s in store.shards(out)], promote_options="default")


def test_n_samples_per_prompt_with_distinct_reproducible_seeds(rebuilt, tiny_models):
    data, store, prof, _ = rebuilt
    src = read(store, "source").filter(pa.compute.equal(read(store, "source").column("status"), OK))
    samples = read(store, "samples").to_pylist()
    items = src.column("item_id").to_pylist()
    assert sorted((r["item_id"], r["candidate"]) for r in samples) == sorted((i, k) for i in items for k in range(N))
    seeds = [r["seed"] for r in samples]
    assert len(set(seeds)) == len(seeds)  # every sample its own seed
    for r in samples:
        assert r["seed"] == sample_seed(prof.sample.seed, r["item_id"], r["candidate"])
    # A sample drawn again alone, from its seed, is the stored image (batch of one vs the stage's batch).
    from richpref.tasks.sample import load_generator

    r = next(x for x in samples if x["candidate"] == N - 1)
    gen = load_generator(prof.sample, prof.models_root)
    img = gen.generate([r["prompt"]], [r["seed"]], steps=prof.sample.steps, guidance_scale=prof.sample.guidance_scale,
                       height=prof.sample.height, width=prof.sample.width, batch_size=1)[0]
    stored = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(img.convert("RGB"), dtype=np.int16) - stored).max() <= 2
    other = next(x for x in samples if x["item_id"] == r["item_id"] and x["candidate"] == 0)
    assert other["image"] != r["image"]


def test_counts_add_up(rebuilt):
    data, store, prof, manifests = rebuilt
    src = read(store, "source")
    kept_items = [r["item_id"] for r in src.to_pylist() if r["status"] == OK]
    assert src.num_rows == 8 and len(kept_items) == 6  # the two repeats rejected as duplicates
    assert all(r["reason"].startswith("duplicate:") for r in src.to_pylist() if r["status"] != OK)
    samples, rewards, ranked, pairs = (read(store, o) for o in ("samples", "rewards", "ranked", "pairs"))
    ok = lambda t: sum(s == OK for s in t.column("status").to_pylist())  # noqa: E731
    assert samples.num_rows == len(kept_items) * N
    assert rewards.num_rows == ok(samples)
    assert ranked.num_rows == len(kept_items) * N * (N - 1) // 2
    assert pairs.num_rows == ok(ranked) > 0
    for t in (samples, rewards, ranked):
        assert all(r["reason"] for r in t.to_pylist() if r["status"] != OK)
    for out, ms in manifests.items():
        assert sum(m.rows for m in ms.values()) == read(store, out).num_rows


def _z(x):
    x = np.asarray(x, dtype=float)
    return (x - x.mean()) / x.std()


def test_labels_come_from_the_rewards(rebuilt):
    """Hand-check: z-score each voting reward over a shard's samples, weigh, compare the two sides."""
    data, store, prof, _ = rebuilt
    weights = {n: prof.relabel.weight(n) for n in prof.score.scored() if prof.relabel.weight(n)}
    assert len(weights) == 2  # two rewards combined
    checked = 0
    for shard in store.shards("pairs"):
        scores = store.read_shard("rewards", shard).to_pylist()
        keys = [(r["item_id"], r["candidate"]) for r in scores]
        comp = sum(w * _z([r[n] for r in scores]) for n, w in weights.items())
        by_key = dict(zip(keys, comp))
        for p in store.read_shard("pairs", shard).to_pylist():
            c0, c1 = by_key[(p["item_id"], p["candidate_0"])], by_key[(p["item_id"], p["candidate_1"])]
            assert p["label_0"] == (1 if c0 > c1 else 0)
            assert p["margin"] == pytest.approx(abs(c0 - c1), abs=1e-9)
            assert abs(c0 - c1) > prof.relabel.min_margin
            s = json.loads(p["scores"])
            assert s["composite_0"] == pytest.approx(c0, abs=1e-9)
            assert (p["seed_0"], p["seed_1"]) == (sample_seed(0, p["item_id"], p["candidate_0"]),
                                                  sample_seed(0, p["item_id"], p["candidate_1"]))
            assert json.loads(p["model_ids"])["sample"]
            checked += 1
    assert checked > 0


def test_pairs_under_the_margin_are_dropped_as_ties(rebuilt):
    data, store, prof, _ = rebuilt
    ranked = read(store, "ranked").to_pylist()
    ties = [r for r in ranked if r["status"] != OK]
    assert ties and all(r["reason"].startswith("tie: composite margin") for r in ties)
    for r in ranked:  # every pair: kept iff its margin is above min_margin
        assert (r["status"] == OK) == (r["margin"] > prof.relabel.min_margin), r


def _scores(rows):
    return rows_to_table(rows, sample_scores_schema(["a"]))


def test_ties_too_few_samples_and_missing_samples_have_reasons():
    cfg = load_profile("tiny-rebuild", ["score.rewards={a: {kind: clip, model: clip}}", "relabel.weights={a: 1.0}",
                                       "relabel.min_margin=0"]).relabel
    ok = lambda i, c, a, d: {"item_id": i, "status": OK, "candidate": c, "a": a, "seed": c, "digest": d,  # noqa: E731
                             "dtypes": "{}"}
    scores = _scores([ok("x", 0, 1.0, "d0"), ok("x", 1, 1.0, "d1"), ok("x", 2, 3.0, "d2"),  # 0 and 1 tie
                      ok("y", 0, 2.0, "e0"), ok("y", 1, 5.0, "e0"),  # same bytes
                      ok("z", 0, 4.0, "f0")])  # one valid sample
    samples = rows_to_table([{"item_id": "y", "status": "rejected", "reason": "flat_image: std 0", "candidate": 2},
                             {"item_id": "z", "status": "rejected", "reason": "flat_image: std 0", "candidate": 1},
                             {"item_id": "z", "status": "rejected", "reason": "flat_image: std 0", "candidate": 2}],
                            sample_scores_schema(["a"]))
    out = rank_items(["x", "y", "z"], samples, scores, cfg, 3, ["a"]).to_pylist()
    assert [(r["candidate_0"], r["candidate_1"]) for r in out[:3]] == pair_index(3) == [(0, 1), (0, 2), (1, 2)]
    x, y, z = out[:3], out[3:6], out[6:]
    assert x[0]["reason"].startswith("tie: composite margin 0") and x[1]["status"] == x[2]["status"] == OK
    assert x[1]["chosen"] == 1  # sample 2 (raw 3.0) beats sample 0 (raw 1.0): jpg_1 preferred
    assert y[0]["reason"] == "tie: the two images are the same bytes"
    assert all(r["reason"].startswith("missing_sample: sample 2 was rejected (flat_image") for r in y[1:])
    assert all(r["reason"].startswith("too_few_samples: 1 valid sample(s) of 3") for r in z)
    # best_vs_worst: one pair per item (x: 2 vs 0), the others not selected
    bvw = rank_items(["x"], samples, scores, cfg.model_copy(update={"pairing": "best_vs_worst"}), 3,
                     ["a"]).to_pylist()
    assert [r["status"] for r in bvw] == ["rejected", OK, "rejected"]
    assert bvw[0]["reason"].startswith("not_selected")


@pytest.mark.parametrize("standardize, z_a, z_b", [
    # by item: minus the item's mean, over the pooled spread (a: 1; b: sqrt(1/2))
    ("item", [-1, 1, 1, -1], [0, 0, 2 ** 0.5, -(2 ** 0.5)]),
    # over the shard: minus the mean of all four, over their spread (a: sqrt(5); b: sqrt(3/4))
    ("shard", [-3 / 5 ** 0.5, -1 / 5 ** 0.5, 3 / 5 ** 0.5, 1 / 5 ** 0.5], [-0.5 / 0.75 ** 0.5] * 2 + [1.5 / 0.75 ** 0.5, -0.5 / 0.75 ** 0.5]),
])
def test_a_pairs_z_scores_composite_margin_and_winner_by_hand(standardize, z_a, z_b):
    """Two rewards, a (weight 1) and b (weight 0.5), two items of two samples: raw a = 0, 2 | 6, 4 and
    b = 1, 1 | 3, 1. The composite is 1 z_a + 0.5 z_b; jpg_1 wins (chosen 1) where its composite is higher."""
    cfg = load_profile("tiny-rebuild", ["score.rewards={a: {kind: clip, model: clip}, b: {kind: clip, model: clip}}",
                                       "relabel.weights={a: 1.0, b: 0.5}", "relabel.min_margin=0",
                                       f"relabel.standardize={standardize}"]).relabel
    raw = {("x", 0): (0.0, 1.0), ("x", 1): (2.0, 1.0), ("y", 0): (6.0, 3.0), ("y", 1): (4.0, 1.0)}
    scores = rows_to_table([{"item_id": i, "status": OK, "candidate": c, "a": a, "b": b, "seed": 10 * c + 7,
                             "digest": f"{i}{c}", "dtypes": "{}"} for (i, c), (a, b) in raw.items()],
                           sample_scores_schema(["a", "b"]))
    samples = rows_to_table([], sample_scores_schema(["a", "b"]))
    x, y = rank_items(["x", "y"], samples, scores, cfg, 2, ["a", "b"]).to_pylist()
    comp = [za + 0.5 * zb for za, zb in zip(z_a, z_b)]
    for r, k in ((x, 0), (y, 2)):
        assert [r["a_z0"], r["a_z1"], r["b_z0"], r["b_z1"]] == pytest.approx([z_a[k], z_a[k + 1], z_b[k], z_b[k + 1]])
        assert [r["composite_0"], r["composite_1"]] == pytest.approx(comp[k:k + 2])
        assert r["margin"] == pytest.approx(abs(comp[k + 1] - comp[k]))
        assert (r["a_0"], r["a_1"], r["seed_0"], r["seed_1"]) == (raw[(r["item_id"], 0)][0], raw[(r["item_id"], 1)][0], 7, 17)
    assert (x["status"], x["chosen"]) == (OK, 1) and (y["status"], y["chosen"]) == (OK, 0)


def test_best_vs_worst_of_equal_samples_is_the_first_two_a_tie_and_a_prompt_without_samples_lists_why():
    cfg = load_profile("tiny-rebuild", ["score.rewards={a: {kind: clip, model: clip}}", "relabel.weights={a: 1.0}",
                                       "relabel.min_margin=0", "relabel.pairing=best_vs_worst"]).relabel
    scores = _scores([{"item_id": "x", "status": OK, "candidate": c, "a": 2.0, "seed": c, "digest": f"d{c}",
                       "dtypes": "{}"} for c in range(3)]
                     + [{"item_id": "z", "status": OK, "candidate": 0, "a": 1.0, "seed": 0, "digest": "e",
                         "dtypes": "{}"}])
    samples = rows_to_table([{"item_id": "z", "status": "rejected", "reason": "flat_image: std 0", "candidate": 1}],
                            sample_scores_schema(["a"]))
    x = rank_items(["x"], samples, scores, cfg, 3, ["a"]).to_pylist()
    assert x[0]["reason"].startswith("tie: composite margin 0") and x[0]["candidate_0"] == 0 and x[0]["candidate_1"] == 1
    assert all(r["reason"].startswith("not_selected: best_vs_worst pairs samples 0 and 1") for r in x[1:])
    with warnings.catch_warnings():  # a shard without a pair to score warned "Mean of empty slice"
        warnings.simplefilter("error")
        z = rank_items(["z"], samples, scores, cfg, 3, ["a"]).to_pylist()
    assert [(r["item_id"], r["candidate"], r["candidate_0"], r["candidate_1"]) for r in z] == [
        ("z", 0, 0, 1), ("z", 1, 0, 2), ("z", 2, 1, 2)]
    assert {r["reason"] for r in z} == {"too_few_samples: 1 valid sample(s) of 3 (1: flat_image: std 0; 2: missing)"}


def test_export_reads_back_as_pick_a_pic(rebuilt, tmp_path, tiny_models):
    import datasets

    from richpref.exports.writer import export_run
    from richpref.training.data import load_pair_source
    from richpref.schemas.training import PairSourceConfig

    data, store, prof, _ = rebuilt
    ds = datasets.load_dataset("parquet", data_files=str(store.stage_dir("pairs")) + "/*.parquet", split="train")
    assert {"caption", "jpg_0", "jpg_1", "label_0", "seed_0", "seed_1", "scores", "model_ids"} <= set(ds.column_names)
    row = ds[0]
    for side in ("jpg_0", "jpg_1"):
        assert Image.open(io.BytesIO(row[side])).size == (prof.sample.width, prof.sample.height)
    assert set(ds["label_0"]) <= {0, 1}
    assert len(load_pair_source(PairSourceConfig(path=str(store.stage_dir("pairs"))))) == len(ds)
    manifest = export_run(data, "r", "pickapic", tmp_path / "out")
    back = datasets.load_dataset(str(tmp_path / "out"), split="train")
    assert len(back) == len(ds) and manifest["format"] == "pickapic"
    card = (store.root + "/pairs/README.md")
    text = open(card).read()
    assert "regenerated set" in text and f"N = {N}" in text and "all_with_margin" in text and "imagereward" in text
    # the images' generator as the pairs' model ids name it (a LoRA or tuned UNet included; before, the
    # profile's sample.model alone)
    assert f"- Images: generated by `{tiny_models / 'sd15'}` ({len(ds)} of {len(ds)} pairs; " in text
    # each reward's weight in the table is its vote (before, 1 for every reward: the previous layout's key)
    for title, weight in (("imagereward", prof.relabel.weight("imagereward")), ("pickscore", prof.relabel.weight("pickscore")),
                          ("hpsv2 (HPSv2 v2.0)", prof.relabel.weight("hpsv2"))):
        assert f"| {title} | {weight:g} | " in text
    assert {prof.relabel.weight(n) for n in ("imagereward", "pickscore", "hpsv2")} == {1.0, 0.5, 0.0}
    # its plots lie beside it and are uploaded with it (before, a rebuild card had none)
    assert card_images_uploaded(card) == ["plots/reward_distributions.png", "plots/margin_histogram.png"]


def test_resume_recomputes_only_missing_work(rebuilt, tmp_path, tiny_models):
    data, store, prof, _ = rebuilt
    work = [(r["stage"], r["shard"]) for r in store.read_log("work.jsonl")]
    assert sorted(work) == sorted(set(work))  # the failed rewards shard 1 was computed once, on resume
    assert ("rewards", 1) in work
    # A new pairing or margin re-runs only the decisions: no sample and no reward again.
    copy = RunStore(str(tmp_path), "r")
    shutil.copytree(store.root, copy.root)
    run_inline(profile(tiny_models, "relabel.pairing=best_vs_worst"), str(tmp_path), "r", report=False)
    again = [(r["stage"], r["shard"]) for r in copy.read_log("work.jsonl")][len(work):]
    assert sorted(again) == [("ranked", 0), ("ranked", 1), ("rebuild_export", 0), ("rebuild_export", 1)]
    ranked = read(copy, "ranked").to_pylist()
    per_item = {}
    for r in ranked:
        per_item[r["item_id"]] = per_item.get(r["item_id"], 0) + (r["status"] == OK)
    assert max(per_item.values()) == 1


def test_profiles_refuse_what_does_not_fit_their_pipeline():
    with pytest.raises(ProfileError, match="sample.num_samples to 2 or more"):
        load_profile("tiny-rebuild", ["sample.num_samples=1"])
    with pytest.raises(ProfileError, match="a rebuild has no original"):
        load_profile("tiny-rebuild", ["relabel.pairing=best_vs_original"])
    with pytest.raises(ProfileError, match="needs `pipeline: rebuild`"):
        load_profile("tiny", ["relabel.pairing=all_with_margin"])
    with pytest.raises(ProfileError, match="set `pipeline: rebuild`"):
        load_profile("tiny", ["sample.num_samples=4"])
    for name in ("sdxl-rebuild", "flux-dev-rebuild"):
        p = load_profile(name)
        assert p.pipeline == "rebuild" and p.sample.num_samples == 4 and p.source.prompt_column == "caption"
    assert load_profile("flux-dev-rebuild").sample.model == "black-forest-labs/FLUX.1-dev"


def test_status_plan_and_views_follow_the_rebuild(rebuilt, tiny_models):
    from richpref.views.inspect import connect, status
    from richpref.run.plan import plan_run

    data, store, prof, _ = rebuilt
    st = status(data, "r")
    assert [s["stage"] for s in st["stages"]] == ["source", "samples", "rewards", "ranked", "pairs"]
    assert not any(s["missing"] or s["failed"] for s in st["stages"])
    assert all(not s.todo and not s.blocked for s in plan_run(prof, data, "r").stages)
    con, views = connect(data, "r")
    assert {"samples", "rewards", "ranked", "pairs", "pairs_full"} <= set(views)
    # pairs_full: one row per source row and sample (ranked, keyed by pair, is not joined in)
    assert con.execute("select count(*) from pairs_full").fetchone()[0] == 2 + 6 * N
    in_pair = con.execute("select count(*) from pairs_full where in_pair").fetchone()[0]
    assert in_pair == len({(i, c) for i, a, b in con.execute("select item_id, candidate_0, candidate_1 from pairs").fetchall()
                           for c in (a, b)})


def test_the_report_shows_the_exported_pairs_with_the_preferred_image_framed(rebuilt):
    # before, a run without an edit stage had "nothing to show"
    from richpref.views.report import build_report

    data, store, _, _ = rebuilt
    pairs = read(store, "pairs")
    page = build_report(data, "r")
    assert f"{pairs.num_rows} exported pairs<" in page and page.count('class="pair"') == pairs.num_rows
    framed = re.findall(r'<img alt="(jpg_[01])" src="data:image/jpeg;base64,[^"]+" class="chosen">', page)
    assert framed == [f"jpg_{0 if label == 1 else 1}" for label in pairs.sort_by(
        [("item_id", "ascending"), ("candidate_0", "ascending"), ("candidate_1", "ascending")]).column("label_0").to_pylist()]
    assert "<b>composite</b>" in page and "label changed only" in page


def test_flux_dev_rebuild_samples_with_the_flux_family(tiny_models):
    """flux-dev-rebuild's sample section on the tiny FLUX.1 [dev] twin: N seeded samples per prompt
    through the generator's FLUX family (distilled guidance, T5 tokens)."""
    from richpref.tasks.rebuild_sample import sample_many
    from richpref.tasks.sample import load_generator

    prof = load_profile("flux-dev-rebuild", ["sample.model=flux", "sample.steps=2", "sample.height=64", "sample.width=64",
                                             "sample.max_sequence_length=64", "sample.dtype=float32", "sample.num_samples=2"],
                        models_root=str(tiny_models))
    rows = pa.table({"item_id": ["i0"], "prompt": ["a red bicycle"]})
    out = sample_many(rows, prof.sample, lambda: load_generator(prof.sample, prof.models_root)).to_pylist()
    assert [(r["candidate"], r["status"]) for r in out] == [(0, OK), (1, OK)]
    assert out[0]["seed"] != out[1]["seed"] and out[0]["image"] != out[1]["image"]
    assert Image.open(io.BytesIO(out[0]["image"])).size == (64, 64)
