"""The dataset card of a rebuild run (`pipeline: rebuild`): it says the set is regenerated and how
(generator, samples per prompt and their seeds, rewards and weights, pairing, margin), with the counts
of every stage, the label balance, per-reward score summaries over the samples and the kept pairs'
composite margins, and plots of the kept pairs' scores and margins beside it."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from richpref.views.card_parts import (PLOTS_DIR, USAGE, _front_matter, counts_table, generated_by, originals,
                                      reward_titles, votes, write_card)

PAIRING = {"best_vs_worst": "each prompt's best sample against its worst",
           "all_with_margin": "every pair of a prompt's samples"}


def rebuild_stats(scores: pa.Table | None, ranked: pa.Table | None, names: list[str]) -> dict[str, Any]:
    """Per reward: mean/std/min/max over the scored samples; margins of the kept pairs; pairs per prompt."""
    out: dict[str, Any] = {"rewards": {}, "margin": {}, "pairs_per_prompt": {}}
    if scores is not None:
        ok = scores.filter(pc.equal(scores.column("status"), "ok"))
        for n in names:
            x = np.asarray(ok.column(n).to_pylist(), dtype=float) if n in ok.schema.names else np.zeros(0)
            out["rewards"][n] = ({"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
                                  "max": float(x.max()), "n": int(x.size)} if x.size else None)
    if ranked is not None:
        kept = ranked.filter(pc.equal(ranked.column("status"), "ok"))
        m = np.asarray(kept.column("margin").to_pylist(), dtype=float)
        if m.size:
            out["margin"] = {q: float(np.quantile(m, p)) for q, p in (("min", 0), ("median", .5), ("max", 1))}
        per: dict[str, int] = {}
        for iid in kept.column("item_id").to_pylist():
            per[iid] = per.get(iid, 0) + 1
        for k in per.values():
            out["pairs_per_prompt"][k] = out["pairs_per_prompt"].get(k, 0) + 1
    return out


def render_rebuild_card(run: str, summary: dict, stats: dict, profile: dict, plots: list[str],
                        models: dict[str | None, int]) -> str:
    sample, relabel = profile.get("sample", {}), profile.get("relabel", {})
    rewards, weights, _, _ = votes(profile)
    titles = reward_titles(rewards)
    n = sample.get("num_samples")
    pairing = relabel.get("pairing", "?")
    voting = ", ".join(f"`{titles[k]}` ({w:g})" for k, w in weights.items() if w != 0)
    only = ", ".join(f"`{titles[k]}`" for k, w in weights.items() if w == 0) or "none"
    src = profile.get("source", {})
    where = src.get("dataset") or src.get("path") or "?"
    lines = _front_matter(f"richpref regenerated pairs ({run})")
    lines += [f"# Regenerated preference pairs: run `{run}`", "",
              "**A regenerated set.** Not human preferences: every image was sampled by richpref from a prompt, and "
              "every label comes from reward models (source → samples → rewards → ranked → export).", "",
              f"- Prompts: `{where}` (column `{src.get('prompt_column', 'caption')}`, duplicates by "
              f"`{src.get('dedupe') or 'none'}` dropped).",
              f"- Images: {generated_by(sample, models)}.",
              f"- Samples per prompt: N = {n}; sample k of a prompt is seeded from (`sample.seed` = {sample.get('seed', 0)}, "
              "item id, k), sample 0 with the item's own seed, so each image can be drawn again on its own "
              "(`seed_0`/`seed_1` of every pair).",
              f"- Rewards: {voting} vote on z-scores (`relabel.standardize: {relabel.get('standardize', 'shard')}`) "
              f"combined by weight; recorded without a vote: {only}.",
              f"- Pairing: `{pairing}`: {PAIRING.get(pairing, pairing)}, kept when the composite margin is above "
              f"`relabel.min_margin` = {relabel.get('min_margin', 0)} (and float noise); ties and pairs under the "
              "margin are dropped with their reason, as are prompts with fewer than 2 valid samples.", "",
              _description(profile), "",
              "`label_0` is 1 when `jpg_0` (sample `candidate_0`) has the higher composite reward, 0 when `jpg_1` "
              "(sample `candidate_1`) does; never 0.5. Provenance columns: `item_id`, `source`, `candidate` (pair index), "
              "`candidate_0`, `candidate_1`, `seed_0`, `seed_1`, `margin`, `scores` (JSON: raw and z-scored rewards and "
              "composites of both images), `model_ids` (JSON: the generator), `config_hash`. `critique`, "
              "`instructions`, `edit_prompt`, `editor`, `edit_mask` are null (nothing was edited).", "",
              *counts_table(summary["stages"])]
    per = ", ".join(f"{k} pair(s): {v} prompt(s)" for k, v in sorted(stats["pairs_per_prompt"].items())) or "–"
    lines += ["", "## Labels", "", f"- label_0 counts: {json.dumps(summary.get('label_0', {}), sort_keys=True)}",
              f"- pairs per prompt: {per}"]
    if stats["margin"]:
        m = stats["margin"]
        lines.append(f"- composite margin of the kept pairs: min {m['min']:.4g}, median {m['median']:.4g}, max {m['max']:.4g}")
    lines += ["", "## Rewards over the scored samples", "", "| reward | weight | mean ± std [min, max] | samples |", "|---|---|---|---|"]
    for name, s in stats["rewards"].items():
        cell = f"{s['mean']:.4g} ± {s['std']:.3g} [{s['min']:.4g}, {s['max']:.4g}]" if s else "–"
        lines.append(f"| {titles.get(name, name)} | {weights.get(name, 0.0):g} | {cell} | {s['n'] if s else 0} |")
    lines += ["", "## Plots", "", "Over the kept pairs: each reward's raw score of the preferred image against the "
              "rejected one's; the composite margins.", ""] + [f"![{p[:-4]}]({PLOTS_DIR}/{p})" for p in plots]
    lines += ["", "## Use", "", USAGE, "", "## Config", "", "The effective profile of the run:", "", "```json",
              json.dumps(profile, indent=2), "```", ""]
    return "\n".join(lines)


def _description(profile: dict) -> str:
    name = profile.get("name", "?")
    return f"Profile: `{name}`" + (f": {profile['description'].strip()}" if profile.get("description") else ".")


def rebuild_plots(ranked: pa.Table | None, names: list[str], min_margin: float) -> dict[str, bytes]:
    """Over the kept pairs: each reward's raw score of the preferred image against the rejected one's,
    and the composite margins (a rebuild has no original to flip against: no flip-rate plot)."""
    from richpref.views.plots import margin_histogram_png, reward_distributions_png

    kept = ranked.filter(pc.equal(ranked.column("status"), "ok")) if ranked is not None else None
    dist, margins = {}, []
    if kept is not None and kept.num_rows:
        chosen = kept.column("chosen").to_pylist()
        for n in (n for n in names if f"{n}_0" in kept.schema.names):
            sides = list(zip(kept.column(f"{n}_0").to_pylist(), kept.column(f"{n}_1").to_pylist()))
            dist[n] = ([pair[c] for pair, c in zip(sides, chosen)], [pair[1 - c] for pair, c in zip(sides, chosen)])
        margins = kept.column("margin").to_pylist()
    return {"reward_distributions.png": reward_distributions_png(dist, ("preferred", "rejected")),
            "margin_histogram.png": margin_histogram_png(margins, min_margin)}


def write_rebuild_card(store, run: str, summary: dict, profile: dict, scores: pa.Table | None,
                       ranked: pa.Table | None) -> dict[str, str]:
    """<run>/pairs/README.md of a rebuild run and its plots (<run>/pairs/plots/); returns their locations."""
    scored = list(votes(profile)[0])
    stats = rebuild_stats(scores, ranked, scored)
    plots = rebuild_plots(ranked, scored, profile.get("relabel", {}).get("min_margin", 0.0))
    card = render_rebuild_card(run, summary, stats, profile, list(plots), originals(store))
    written = write_card(store.fs, store.stage_dir("pairs"), card, plots)
    return {name: store.uri(path) for name, path in written.items()}
