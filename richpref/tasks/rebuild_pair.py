"""ranked (rebuild): every possible pair of a prompt's samples, kept with a label from the rewards or
rejected with a reason; no model call.

Per voting reward the raw scores of the shard's valid samples (of prompts with two or more) are z-standardised (`relabel.standardize:
shard`, or centred per prompt and scaled by the pooled spread: `item`) and combined with
`relabel.weights`. `relabel.pairing` picks the pairs: `best_vs_worst` keeps the prompt's best sample against its
worst, `all_with_margin` every pair whose composite margin is above `relabel.min_margin`. A pair whose
margin is at or below `min_margin` (within float noise of it, richpref/tasks/pairing.py) or whose two images
are the same bytes is a tie, dropped with its reason, so exported labels are always 0 or 1. A prompt
with fewer than two valid samples has no pair: each of its pair rows says so.

Pair p of a prompt is (candidate_0, candidate_1) = the p-th of (0,1), (0,2), …, (1,2), … (`pair_index`).
"""
from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pyarrow as pa

from richpref.tasks.pairing import relative_noise, standardise, z_noise
from ..schemas.config import Profile, RelabelConfig
from ..schemas.tables import OK, ranked_schema, rows_to_table
from .base import Stage, StageContractError, StageInputs, kept, rejected
from .rebuild_sample import num_samples


def pair_index(n: int) -> list[tuple[int, int]]:
    """The pairs of n samples in row order: (0,1), (0,2), …, (0,n-1), (1,2), …"""
    return list(combinations(range(n), 2))


def num_pairs(profile: Profile) -> int:
    n = num_samples(profile)
    return n * (n - 1) // 2


def composites(raw: dict[str, np.ndarray], groups: np.ndarray, cfg: RelabelConfig,
               dtypes: dict[str, str]) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """(z per reward, weighted composite, float noise of one composite) over the valid samples."""
    z_all, comp, noise = {}, np.zeros(len(groups)), 0.0
    for name, values in raw.items():
        z, spread = standardise(values, groups if cfg.standardize == "item" else None)
        z_all[name] = z
        weight = cfg.weight(name)
        comp += weight * z
        noise += abs(weight) * z_noise(values, spread, relative_noise(dtypes.get(name)))
    return z_all, comp, noise


def rank_items(item_ids: list[str], samples: pa.Table, scores: pa.Table, cfg: RelabelConfig, n: int,
               names: list[str]) -> pa.Table:
    """n·(n-1)/2 rows per item of `item_ids`, in order: its pairs, kept or rejected with a reason.
    `samples` are the samples stage's rows (for the reasons of rejected samples), `scores` the rewards
    stage's rows, `names` its rewards (score.rewards)."""
    missing = [x for x in names if x not in scores.schema.names]
    if missing:
        raise StageContractError(f"the sample scores lack {missing}: the rewards stage ran with other score.rewards")
    why: dict[tuple[str, int], str] = {}
    for r in samples.select(["item_id", "candidate", "status", "reason"]).to_pylist():
        if r["status"] != OK:
            why[(r["item_id"], r["candidate"])] = r["reason"]
    valid: dict[str, dict[int, dict]] = {}
    for r in scores.to_pylist():
        if r["status"] == OK:
            valid.setdefault(r["item_id"], {})[r["candidate"]] = r
        else:
            why[(r["item_id"], r["candidate"])] = r["reason"]
    pool = [(iid, c) for iid in item_ids if len(valid.get(iid, {})) >= 2 for c in sorted(valid[iid])]
    pos = {key: k for k, key in enumerate(pool)}
    raw = {name: np.array([valid[i][c][name] for i, c in pool], dtype=np.float64) for name in names}
    order = {iid: j for j, iid in enumerate(item_ids)}
    groups = np.array([order[i] for i, _ in pool], dtype=np.int64)
    dtypes = json.loads(valid[pool[0][0]][pool[0][1]]["dtypes"] or "{}") if pool else {}
    z, comp, noise = composites(raw, groups, cfg, dtypes)
    tolerance = 2 * noise
    pairs = pair_index(n)
    out = []
    for iid in item_ids:
        have = valid.get(iid, {})
        if len(have) < 2:
            bad = "; ".join(f"{c}: {why.get((iid, c), 'missing')}" for c in range(n) if c not in have)
            reason = f"too_few_samples: {len(have)} valid sample(s) of {n} ({bad})"
            out += [rejected(iid, reason, candidate=p, candidate_0=a, candidate_1=b) for p, (a, b) in enumerate(pairs)]
            continue
        ks = {c: pos[(iid, c)] for c in have}
        c_of = {c: float(comp[k]) for c, k in ks.items()}
        selected = None
        if cfg.pairing == "best_vs_worst":
            best = max(c_of, key=lambda c: (c_of[c], -c))
            worst = min(c_of, key=lambda c: (c_of[c], c))
            if best == worst:  # every sample scored the same: the first two, a tie
                best, worst = sorted(c_of)[:2]
            selected = (min(best, worst), max(best, worst))
        for p, (a, b) in enumerate(pairs):
            base = {"candidate": p, "candidate_0": a, "candidate_1": b}
            if a not in have or b not in have:
                gone = a if a not in have else b
                out.append(rejected(iid, f"missing_sample: sample {gone} was rejected ({why.get((iid, gone), 'missing')})",
                                    **base))
                continue
            ra, rb = have[a], have[b]
            v = {**base, "seed_0": ra["seed"], "seed_1": rb["seed"]}
            for name in names:
                v.update({f"{name}_0": ra[name], f"{name}_1": rb[name],
                          f"{name}_z0": float(z[name][ks[a]]), f"{name}_z1": float(z[name][ks[b]])})
            v.update(composite_0=c_of[a], composite_1=c_of[b], margin=abs(c_of[b] - c_of[a]))
            if selected is not None and (a, b) != selected:
                out.append(rejected(iid, f"not_selected: best_vs_worst pairs samples {selected[0]} and {selected[1]} "
                                    f"(composites {c_of[selected[0]]:.4g} / {c_of[selected[1]]:.4g})", **v))
            elif ra["digest"] == rb["digest"]:
                out.append(rejected(iid, "tie: the two images are the same bytes", **v))
            elif v["margin"] <= cfg.min_margin + tolerance or v["margin"] <= 1e-12:
                out.append(rejected(iid, f"tie: composite margin {v['margin']:.4g} <= relabel.min_margin "
                                    f"{cfg.min_margin:g} + float noise {tolerance:.2g}", **v))
            else:
                out.append(kept(iid, chosen=1 if c_of[b] > c_of[a] else 0, **v))
    return rows_to_table(out, ranked_schema(names))


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    return rank_items(inputs.rows.column("item_id").to_pylist(), inputs.tables["samples"], inputs.tables["rewards"],
                      profile.relabel, num_samples(profile), profile.score.scored())


# Driven by the source's kept prompts (one per item), so a prompt none of whose samples survived
# still leaves with its reason.
STAGE = Stage(name="ranked", version="1", section="relabel", reads=("source", "samples", "rewards"), compute=compute,
              fan_out=num_pairs, loads_model=False, schema=lambda p: ranked_schema(p.score.scored()))
