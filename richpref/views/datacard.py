"""Dataset card (README.md beside the pairs) and its plots (PNG, in the pairs folder's plots/) for a
curated run or a relabelled dataset; optional upload to the Hugging Face Hub.

    write_run_report(data_dir, run)     -> <run>/pairs/README.md, <run>/pairs/plots/*.png
    write_relabel_report(out_dir, ...)  -> <out_dir>/README.md, <out_dir>/plots/*.png
    push_to_hub(folder, repo_id)        -> uploads a folder's Parquet files, README.md and plots (HUB_FILES)

The card and its plots live in one folder, so the card's image links hold wherever it is copied or
uploaded.

The card states counts per stage with reject reasons, the flip rate, label counts, per-reward score
summaries, composite margins and the effective config, so a dataset can be judged without the run.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from richpref.run.runner import stage_manifests
from richpref.schemas.reward_titles import reward_titles
from richpref.views.card_parts import (HUB_FILES, PLOTS_DIR, USAGE, _front_matter, counts_table,  # noqa: F401 - USAGE re-exported
                                      generated_by, originals, votes, write_card)
from richpref.views.plots import flip_rate_png, margin_histogram_png, reward_distributions_png

PLOTS = ("reward_distributions.png", "flip_rate.png", "margin_histogram.png")
SCORE_META = ("item_id", "status", "reason", "candidate", "candidate_0", "candidate_1", "chosen", "flipped", "margin",
              "composite_0", "composite_1")


def reward_names(scores: pa.Table) -> list[str]:
    return [c[: -len("_z0")] for c in scores.schema.names if c.endswith("_z0")]


def scored_rows(scores: pa.Table) -> pa.Table:
    """Rows that got scores: kept pairs, ties and edits not selected for their item's pair (rejected
    for a bad image or score have none); of a run's rows, those comparing an edit with its original."""
    status, reason = scores.column("status"), pc.fill_null(scores.column("reason"), "")
    scored = pc.or_(pc.equal(status, "ok"), pc.or_(pc.starts_with(reason, "tie:"), pc.starts_with(reason, "not_selected:")))
    if "candidate_0" in scores.schema.names:
        scored = pc.and_(scored, pc.equal(pc.fill_null(scores.column("candidate_0"), -1), -1))
    return scores.filter(scored)


def score_stats(scores: pa.Table) -> dict[str, Any]:
    """Per reward: mean/std/min/max of side 0 and side 1 and the share of pairs where side 1 < side 0,
    over scored rows; composite: the same share over kept pairs, and margin quantiles."""
    rows = scored_rows(scores)
    out: dict[str, Any] = {"scored": rows.num_rows, "rewards": {}}
    for name in reward_names(scores):
        a = np.asarray(rows.column(f"{name}_0").to_pylist(), dtype=float)
        b = np.asarray(rows.column(f"{name}_1").to_pylist(), dtype=float)
        both = np.isfinite(a) & np.isfinite(b)  # a report-only reward may have no score (NaN) on a row
        a, b = a[both], b[both]

        def describe(x: np.ndarray) -> dict:
            return ({"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}
                    if x.size else {})

        out["rewards"][name] = {"side_0": describe(a), "side_1": describe(b),
                                "side_1_lower": float((b < a).mean()) if a.size else None}
    kept_rows = scores.filter(pc.equal(scores.column("status"), "ok"))
    margins = np.asarray(kept_rows.column("margin").to_pylist(), dtype=float)
    with_original = (kept_rows.filter(pc.equal(pc.fill_null(kept_rows.column("candidate_0"), -1), -1))
                     if "candidate_0" in kept_rows.schema.names else kept_rows)
    flipped = with_original.column("flipped").to_pylist()  # pairs of two edits cannot flip
    out["kept"] = kept_rows.num_rows
    out["composite_flip_rate"] = (sum(bool(f) for f in flipped) / len(flipped)) if flipped else None
    out["margin"] = ({q: float(np.quantile(margins, p)) for q, p in (("min", 0), ("p10", .1), ("median", .5), ("p90", .9), ("max", 1))}
                     if margins.size else {})
    return out


def plot_inputs(scores: pa.Table | None) -> tuple[dict[str, tuple[list, list]], dict[str, float], list]:
    """What the plots draw: per reward, both sides' scores over the scored rows; per reward, and for the
    composite, the share of pairs where side 1 scores lower (score_stats); the kept pairs' margins."""
    if scores is None or scores.num_rows == 0:
        return {}, {}, []
    rows = scored_rows(scores)
    dist = ({n: (rows.column(f"{n}_0").to_pylist(), rows.column(f"{n}_1").to_pylist()) for n in reward_names(scores)}
            if rows.num_rows else {})
    stats = score_stats(scores)
    rates = {n: s["side_1_lower"] for n, s in stats["rewards"].items() if s["side_1_lower"] is not None}
    if stats["composite_flip_rate"] is not None:
        rates["composite"] = stats["composite_flip_rate"]
    margins = scores.filter(pc.equal(scores.column("status"), "ok")).column("margin").to_pylist()
    return dist, rates, margins


def plots_for(scores: pa.Table | None, min_margin: float, labels: tuple[str, str]) -> dict[str, bytes]:
    dist, rates, margins = plot_inputs(scores)
    return {"reward_distributions.png": reward_distributions_png(dist, labels),
            "flip_rate.png": flip_rate_png(rates, title=f"share of pairs where {labels[1]} scores lower"),
            "margin_histogram.png": margin_histogram_png(margins, min_margin)}


def _score_table(stats: dict, weights: dict[str, float], labels: tuple[str, str],
                 titles: dict[str, str] | None = None) -> list[str]:
    def fmt(d: dict) -> str:
        return f"{d['mean']:.4g} ± {d['std']:.3g} [{d['min']:.4g}, {d['max']:.4g}]" if d else "–"

    lines = [f"| reward | weight | {labels[0]} mean ± std [min, max] | {labels[1]} mean ± std [min, max] | {labels[1]} lower |",
             "|---|---|---|---|---|"]
    for name, s in stats["rewards"].items():
        lower = f"{s['side_1_lower']:.1%}" if s["side_1_lower"] is not None else "–"
        lines.append(f"| {(titles or {}).get(name, name)} | {weights.get(name, 1.0):g} | {fmt(s['side_0'])} | {fmt(s['side_1'])} | {lower} |")
    return lines


def _votes_line(profile: dict) -> str:
    """Which rewards decide the labels, which are only recorded, and the subject gate."""
    _, weights, gate, min_consistency = votes(profile)
    voting = [f"`{n}` ({w:g})" for n, w in weights.items() if w != 0]
    only = [n for n, w in weights.items() if w == 0]
    return (f"Labels decided by {', '.join(voting) or '–'}; recorded without a vote: "
            f"{', '.join(f'`{n}`' for n in only) or 'none'}; subject gate: "
            + (f"DINOv2 patch consistency ≥ {min_consistency} (`{gate.get('model')}`)." if gate else "off."))


def _profile_line(run: str, profile: dict) -> str:
    """Which profile made the run and what it adds to RPO's pipeline (its `description`)."""
    name = profile.get("name", "?")
    return f"Profile: `{name}`" + (f": {profile['description'].strip()}" if profile.get("description") else ".")


def _sample_line(sample: dict) -> str:
    """How originals were made: the safety checker setting and the flat-image bar."""
    checker = sample.get("safety_checker", False)
    return (f"Sampling: `sample.safety_checker: {str(bool(checker)).lower()}` (generated originals "
            + ("pass the checkpoint's safety checker; flagged ones come out black" if checker else
               "are not blacked out by a safety checker")
            + f"); originals flatter than pixel std {sample.get('min_image_std', 1.0):g} are rejected as `flat_image`.")


def _images_line(export: dict) -> str:
    """How the pair's images are stored, and what `edit_mask` is."""
    fmt = export.get("image_format", "png")
    enc = ("PNG (lossless)" if fmt == "png" else
           f"JPEG at quality {export.get('jpeg_quality') or 'of the source image'}")
    return (f"Images: both `jpg_0` and `jpg_1` at the edit's size, both {enc} (`export.image_format: {fmt}`). "
            "`edit_mask`: PNG, mode L, the pair's size, 255 where the two images differ (largest channel "
            f"difference > {export.get('mask_threshold', 32)}/255, specks removed, dilated by "
            f"{export.get('mask_dilation', 8)} px), 0 elsewhere.")


def render_run_card(run: str, summary: dict, stats: dict, profile: dict, plots_rel: str,
                    models: dict[str | None, int]) -> str:
    rewards, weights, _, _ = votes(profile)
    labels = ("original", "edited")
    edit = profile.get("edit", {})
    lines = _front_matter(f"richpref pairs ({run})")
    lines += [f"# richpref preference pairs: run `{run}`", "",
              "Synthetic preference pairs in Pick-a-Pic format, curated by richpref "
              "(critique → instruct → edit → cutout → check → filter → score → relabel → export).", "",
              "`jpg_0` is the original image, `jpg_1` its edit; `label_0` is 1 when the original is preferred "
              "(a *flipped* pair: the edit scored lower) and 0 when the edit is. No ties (0.5). With several edits "
              "per item and `relabel.pairing: best_vs_worst`, a pair may hold two edits: `candidate_0`/`candidate_1` "
              "say which images a pair holds (-1 = the original).", "",
              _profile_line(run, profile), "",
              f"Originals: {generated_by(profile.get('sample', {}), models)}.", "",
              _sample_line(profile.get("sample", {})), "",
              f"Editor: `{edit.get('kind', 'controlnet_img2img')}` (`{edit.get('model', '?')}`), edit resolution "
              f"`{edit.get('resolution', 'native')}`, edit prompts past a text encoder's limit: "
              f"`{edit.get('long_prompt', 'cap')}` (instructions that did not reach the editor are not checked).", "",
              _images_line(profile.get("export", {})), "",
              "Provenance columns: `item_id`, `source`, `critique`, `instructions`, `edit_prompt`, `candidate_0`, "
              "`candidate_1`, `margin`, `flipped`, "
              "`scores` (JSON: every raw and z-standardised score), `model_ids` (JSON), `config_hash`, "
              "`editor` (`edit.kind`), `edit_mask`.", "",
              *counts_table(summary["stages"])]
    flip = summary.get("flip_rate")
    lines += ["", "## Labels", "",
              f"- pairs exported: {sum(summary.get('label_0', {}).values())} "
              f"(label_0 counts: {json.dumps({str(k): v for k, v in summary.get('label_0', {}).items()})})",
              f"- flip rate (of the pairs holding the original: the edit scored lower, label_0 = 1): {flip:.1%}" if flip is not None else "- flip rate: –",
              "", "## Scores", "",
              f"Over the {stats['scored']} scored edits, each against its original (kept pairs, ties, and edits "
              f"not selected for their item's pair); pairing `{profile.get('relabel', {}).get('pairing', 'best_vs_original')}`, "
              f"standardisation "
              f"`{profile.get('relabel', {}).get('standardize', '?')}`, ties at margin ≤ "
              f"{profile.get('relabel', {}).get('min_margin', 0)} (and within float noise of it, or the same bytes).", "",
              _votes_line(profile), ""]
    lines += _score_table(stats, weights, labels, reward_titles(rewards))
    if stats["margin"]:
        m = stats["margin"]
        lines += ["", f"Composite margin of the kept pairs: min {m['min']:.4g}, p10 {m['p10']:.4g}, "
                      f"median {m['median']:.4g}, p90 {m['p90']:.4g}, max {m['max']:.4g}."]
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({plots_rel}/{p})" for p in PLOTS]
    lines += ["", "## Use", "", USAGE, "", "## Config", "", "The effective profile of the run:", "", "```json",
              json.dumps(profile, indent=2), "```", ""]
    return "\n".join(lines)


def _read_stage(store, stage: str) -> pa.Table | None:
    tables = [store.read_shard(stage, s) for s in sorted(stage_manifests(store, stage))]  # committed shards only
    if not tables:
        return None
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="default")


def write_run_report(data_dir: str, run: str) -> dict[str, str]:
    """README.md beside the run's pairs and the PNG plots under `<run>/pairs/plots/`; returns their locations.
    Call it after the export stage (the curate flow does at its end)."""
    from richpref.views.inspect import RunNotFound, summary as run_summary
    from richpref.run.storage import RunStore, join

    store = RunStore(data_dir, run)
    summary = run_summary(data_dir, run)
    if not stage_manifests(store, "pairs"):  # the card describes the pairs: none yet, no card
        raise RunNotFound(f"run {run!r} has no committed pairs shards under {store.uri(store.stage_dir('pairs'))}; "
                          f"run `richpref curate --run {run}` to its end first")
    profile_path = join(store.root, "profile.json")
    profile = json.loads(store.fs.cat_file(profile_path)) if store.fs.exists(profile_path) else {}
    if profile.get("pipeline") == "rebuild":
        from richpref.views.datacard_rebuild import write_rebuild_card

        return write_rebuild_card(store, run, summary, profile, _read_stage(store, "rewards"), _read_stage(store, "ranked"))
    if profile.get("pipeline") == "relabel_dataset":
        return _rewrite_relabel_card(store, run)
    scores = _read_stage(store, "relabel")
    stats = score_stats(scores) if scores is not None else {"scored": 0, "rewards": {}, "margin": {}}
    min_margin = profile.get("relabel", {}).get("min_margin", 0.0)
    card = render_run_card(run, summary, stats, profile, PLOTS_DIR, originals(store))
    written = write_card(store.fs, store.stage_dir("pairs"), card,
                         plots_for(scores, min_margin, ("original", "edited")))
    return {name: store.uri(path) for name, path in written.items()}


def render_relabel_card(summary: dict, stats: dict) -> str:
    weights = {n: r.get("weight", 1.0) for n, r in summary["rewards"].items()}
    labels = ("jpg_0", "jpg_1")
    agree = summary.get("agreement_with_source_label")
    lines = _front_matter("relabelled preference pairs")
    lines += ["# Relabelled preference pairs (richpref relabel-dataset)", "",
              f"`label_0` rewritten by {', '.join(f'`{n}`' for n in summary['rewards'])}: 1 when jpg_0 scores higher, "
              "0 when jpg_1 does; undecodable rows dropped. The source label is kept as `label_0_source`; "
              "`margin` and `scores` (JSON) record why.", "",
              f"Near-ties: {summary.get('near_ties', 'dropped')}.", "",
              "## Counts", "", f"- source rows: {summary['rows']} in {summary['shards']} shard(s)",
              f"- kept: {summary['kept']}",
              f"- dropped: {json.dumps(summary['rejected']) if summary['rejected'] else 'none'}",
              f"- agreement with the source label (over {summary['source_rows_with_a_label']} kept rows labelled 0/1): "
              + (f"{agree:.1%}" if agree is not None else "–"),
              f"- jpg_1 preferred: {1 - stats['composite_flip_rate']:.1%}" if stats.get("composite_flip_rate") is not None else "",
              "", "## Scores", ""]
    lines += _score_table(stats, weights, labels, reward_titles(summary["rewards"]))
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({PLOTS_DIR}/{p})" for p in PLOTS]
    lines += ["", "## Use", "", USAGE, "", "## Config", "", "```json",
              json.dumps({k: summary.get(k) for k in ("source", "rewards", "standardize", "min_margin", "near_ties")}, indent=2), "```", ""]
    return "\n".join(lines)


def write_relabel_report(out_dir: str, summary: dict, scores: pa.Table | None, rewards: list[str],
                         min_margin: float) -> dict[str, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(out_dir)
    root = root.rstrip("/")
    stats = score_stats(scores) if scores is not None and scores.num_rows else {"scored": 0, "rewards": {}, "margin": {},
                                                                                 "composite_flip_rate": None}
    written = write_card(fs, root, render_relabel_card(summary, stats), plots_for(scores, min_margin, ("jpg_0", "jpg_1")))
    return {name: out_dir.rstrip("/") + path[len(root):] for name, path in written.items()}  # as given: a URL stays one


def _rewrite_relabel_card(store, run: str) -> dict[str, str]:
    """A relabel-dataset run's card and plots again, from its summary (relabel.json) and scores, as the
    command wrote them: not the edit card, whose columns and flip rate such a run has not."""
    from richpref.run.storage import join
    from richpref.views.inspect import RunNotFound

    path = join(store.root, "relabel.json")
    if not store.fs.exists(path):  # stopped before its end: one error line (exit 2), not a traceback
        raise RunNotFound(f"run {run} is a relabel-dataset run without its summary ({store.uri(path)}): "
                          "run `richpref relabel-dataset` again to finish it (done shards are kept)")
    summary = json.loads(store.fs.cat_file(path))
    scores = _read_stage(store, "relabel")
    # the run's own pairs folder, not the one relabel.json names: the run may have been moved since
    pairs = store.uri(store.stage_dir("pairs"))
    return write_relabel_report(pairs, summary, scores, list(summary["rewards"]), summary["min_margin"])


class PushFailed(RuntimeError):
    """The Hub did not take the upload; the message says why and how to retry."""


def push_to_hub(folder: str, repo_id: str, *, token: str | None = None, private: bool = True) -> str:
    """Upload a pairs folder (its Parquet shards, README.md and its plots) as a Hub dataset; returns the repo URL.
    Needs network access and a token with write access (`hf auth login` or `token=`)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="dataset",
                          allow_patterns=list(HUB_FILES),
                          commit_message="richpref: upload preference pairs")
    except Exception as exc:  # noqa: BLE001 - offline, no network, no token, no write access: one message
        raise PushFailed(f"{folder} was not uploaded to the Hub dataset {repo_id!r} ({type(exc).__name__}: {exc}); "
                         "check HF_HUB_OFFLINE, the network and a token with write access (`hf auth login`), "
                         "then push again") from exc
    return str(url)
