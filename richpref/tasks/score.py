"""score: the model calls of relabelling, nothing decided.

Per (item, edit candidate) row the check stage answered (whatever the filter's verdict): the raw score of the item's original and of the edit under every
reward of `score.rewards`, the DINOv2 patch consistency of the edit with its original when
`score.subject_gate` is set, a digest of each image's bytes and the dtype each reward ran in. A
reward with `on_cutout: true` (and the gate, by default) sees the cutout stage's foreground cut-outs
instead of the full images. A non-finite score is recorded as NaN and why in `unscored`; whether it
rejects the pair (it does for a reward that votes or gates) is relabel's to say.

Weights, z-scores, the gates' thresholds, pairing, flips and ties are the relabel stage's (a cheap
step after this one, the `relabel:` section): this stage keys on the `score:` section, so tuning a
threshold or a weight re-runs no reward model.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from richpref.common.images import BadImage, decode_image
from ..models.rewards import MODEL_REF_OPTIONS, is_pairwise, load_reward, load_reward_spec
from ..models.runtime import resident, resolve_model_ref
from richpref.tasks.pairing import scorer_dtype
from ..prompts import template_hash
from ..schemas.config import Profile, ScoreConfig, config_data
from ..schemas.rewards import REWARD_KINDS
from ..schemas.tables import reward_scores_schema, rows_to_table
from .base import ModelUse, Stage, StageInputs, kept, rejected

log = logging.getLogger("richpref")

SUBJECT = "subject_consistency"  # the scorer name of the subject gate's DINOv2
# The options that name a question a VLM judge is asked (a prompt template): their text is keyed.
TEMPLATE_OPTIONS = ("template", "quality_template")


class RewardSet:
    """Every scorer a score config needs, each loaded on first use and kept for the stage: a stage runs
    shard after shard, and reloading every reward per shard would dominate its time. Held in the
    one-resident-model slot as a unit, so the next stage's model releases all of them."""

    def __init__(self, cfg: ScoreConfig, models_root: str | None) -> None:
        self.cfg, self.models_root = cfg, models_root
        self.scorers: dict[str, Any] = {}

    def get(self, name: str):
        if name not in self.scorers:
            if name == SUBJECT:
                gate = self.cfg.subject_gate
                self.scorers[name] = load_reward("dino_patch", resolve_model_ref(gate.model, self.models_root),
                                                 patch=gate.patch, stride=gate.stride, device=self.cfg.device,
                                                 dtype=self.cfg.dtype)
            else:
                self.scorers[name] = load_reward_spec(self.cfg.rewards[name], self.models_root, device=self.cfg.device,
                                                      dtype=self.cfg.dtype)
        return self.scorers[name]

    def close(self) -> None:
        for s in self.scorers.values():
            if hasattr(s, "close"):
                s.close()
        self.scorers.clear()

    def on_release(self) -> None:
        """When the stage ends: a served reward (vlm_score, a judge) stops the server it launched."""
        for s in self.scorers.values():
            hook = getattr(s, "on_release", None) or getattr(getattr(s, "vlm", None), "on_release", None)
            if callable(hook):
                hook()


def reward_set(cfg: ScoreConfig, models_root: str | None) -> RewardSet:
    key = ("rewards", json.dumps(scoring_view(cfg), sort_keys=True), models_root, cfg.device)
    return resident.get(key, lambda: RewardSet(cfg, models_root))


def load_scorer(name: str, cfg: ScoreConfig, models_root: str | None):
    return reward_set(cfg, models_root).get(name)


def scoring_view(cfg: ScoreConfig) -> dict:
    """The score stage's key: the whole `score:` section (less batch size and device, and a served
    reward's endpoint; the dtype counts: 16-bit scores differ from float32 ones), and each launched
    server's kind (transformers serve answers digits, not logprobs)."""
    view = config_data(cfg)
    view["dtype"] = cfg.dtype
    for n in cfg.scored():
        if cfg.rewards[n].engine.answer_key():
            view["rewards"][n]["answers"] = cfg.rewards[n].engine.answer_key()
    return view


def needs_cutouts(cfg: ScoreConfig) -> bool:
    gate = cfg.subject_gate
    return any(cfg.rewards[n].on_cutout for n in cfg.scored()) or bool(gate and gate.on_cutout)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def score_images(names: list[str], cfg: ScoreConfig, get_scorer: Callable, prompts: list[str],
                 images: dict[str, list], owner: list[int], item_prompts: list[str],
                 originals: dict[str, list], instructions: list[str] | None = None,
                 item_instructions: list[str] | None = None,
                 unparsed: dict[str, dict[int, str]] | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """Raw scores per reward (one per item's original, one per edit row) and the dtype each reward ran
    in. `images` holds the decoded edits (and edited cut-outs) per row, `originals` the decoded
    originals (and cut-outs) per item; `owner[k]` is the item of row k. An edit judge scores each
    edit from (original, instruction, edit) and each original as the edit that changes nothing (under
    its item's first row's instructions): a pair reward (edit_reward) through `edit_judge_scores`, a
    generative one (edit_score) in one pass; a generative judge's answers that gave no score land in
    `unparsed[name]` (position -> raw answer)."""
    orig_raw, edit_raw, dtypes = {}, {}, {}
    m, n = len(item_prompts), len(prompts)
    for name in names:
        spec = cfg.rewards[name]
        o_side, e_side = ("original_cutout", "edited_cutout") if spec.on_cutout else ("original", "edited")
        scorer = get_scorer(name)
        dtypes[name] = scorer_dtype(scorer)
        if is_pairwise(scorer):
            instr = instructions if instructions is not None else prompts
            orig_raw[name], edit_raw[name] = edit_judge_scores(scorer, originals[o_side], owner, images[e_side], instr,
                                                               cfg.batch_size)
            continue
        if getattr(scorer, "edit_judge", False):
            if instructions is None or item_instructions is None:
                raise ValueError(f"reward {name!r} ({spec.kind}) judges edits: it needs each edit's instructions")
            flat = np.asarray(scorer.score_edits(
                originals[o_side] + [originals[o_side][j] for j in owner], originals[o_side] + images[e_side],
                item_instructions + instructions, batch_size=cfg.batch_size), dtype=np.float64)
        else:
            flat = np.asarray(scorer.score(originals[o_side] + images[e_side], item_prompts + prompts,
                                           batch_size=cfg.batch_size), dtype=np.float64)
        if flat.shape != (m + n,):
            raise RuntimeError(f"reward {name!r} returned shape {flat.shape} for {m + n} images")
        if unparsed is not None and getattr(scorer, "unparsed", None):
            unparsed[name] = dict(scorer.unparsed)
        orig_raw[name], edit_raw[name] = flat[:m], flat[m:]
    return orig_raw, edit_raw, dtypes


def unparsed_reason(names: list[str], unparsed: dict[str, dict[int, str]], positions: tuple[int, int]) -> str | None:
    """`unparsed_answer: …` with the raw answer of the first judge whose answer (at the original's
    or the edit's position) gave no score; None when every answer gave one."""
    for name in names:
        for pos in positions:
            raw = unparsed.get(name, {}).get(pos)
            if raw is not None:
                return f"unparsed_answer: {name} answered {raw[:400]!r}"
    return None


def edit_judge_scores(scorer, originals: list, owner: list[int], edits: list, instructions: list[str],
                      batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """An edit judge's raw scores: per item, its original judged as an unchanged edit of itself under
    its first row's instructions (NaN for an item with no row: never compared); per row, the edit.
    A judge with `score_edits` judges each original once, whatever its number of candidates."""
    first = {j: r for r, j in reversed(list(enumerate(owner)))}
    items = sorted(first)
    if hasattr(scorer, "score_edits"):
        edit = np.asarray(scorer.score_edits([originals[j] for j in owner], edits, instructions, batch_size=batch_size),
                          dtype=np.float64)
        same = [originals[j] for j in items]
        orig = np.asarray(scorer.score_edits(same, same, [instructions[first[j]] for j in items], batch_size=batch_size),
                          dtype=np.float64)
    else:
        s = np.asarray(scorer.score_pairs([originals[j] for j in owner], edits, instructions, batch_size=batch_size),
                       dtype=np.float64)
        if s.shape != (len(edits), 2):
            raise RuntimeError(f"edit judge returned shape {s.shape} for {len(edits)} pairs")
        edit, orig = s[:, 1], s[[first[j] for j in items], 0]
    if edit.shape != (len(edits),) or orig.shape != (len(items),):
        raise RuntimeError(f"edit judge returned shapes {edit.shape}, {orig.shape} for {len(edits)} edits of {len(items)} items")
    by_item = dict(zip(items, orig))
    return np.array([by_item.get(j, np.nan) for j in range(len(originals))]), edit


def subject_consistency(cfg: ScoreConfig, get_scorer: Callable, images: dict[str, list], owner: list[int],
                        originals: dict[str, list], prompts: list[str]) -> np.ndarray:
    """Per edit row: the DINOv2 patch consistency of the edit with its item's original."""
    o_side, e_side = ("original_cutout", "edited_cutout") if cfg.subject_gate.on_cutout else ("original", "edited")
    s = np.asarray(get_scorer(SUBJECT).score_pairs([originals[o_side][j] for j in owner], images[e_side], prompts,
                                                   batch_size=cfg.batch_size), dtype=np.float64)
    if s.shape != (len(owner), 2):
        raise RuntimeError(f"the subject gate returned shape {s.shape} for {len(owner)} pairs")
    return s[:, 1]


def score_rows(item_ids: list[str], prompts: list, images: dict[str, list], cfg: ScoreConfig, get_scorer,
               candidates: list[int] | None = None, instructions: list[str] | None = None) -> pa.Table:
    """One row of raw scores per (item, edit candidate) row, in input order.

    `images` maps original/edited (and original_cutout/edited_cutout when a reward or the gate needs
    them) to encoded bytes per row; an item's rows share its original. Undecodable images and a
    non-finite subject consistency reject the row (the whole item when the original is at fault); a
    reward's non-finite score is left NaN with why in `unscored` (relabel rejects the pair when that
    reward votes or gates)."""
    names = cfg.scored()
    n_rows = len(item_ids)
    if instructions is None and "instruction" in images:  # the edit instructions given with the images
        instructions = images["instruction"]
    candidates = list(candidates) if candidates is not None else [0] * n_rows
    cut = needs_cutouts(cfg)
    o_sides = ["original"] + (["original_cutout"] if cut else [])
    e_sides = ["edited"] + (["edited_cutout"] if cut else [])
    out: dict[int, dict] = {}
    items: dict[str, int] = {}  # item_id -> index among decoded originals
    originals: dict[str, list] = {side: [] for side in o_sides}
    orig_digest: list[str] = []
    item_prompts: list[str] = []
    item_instructions: list[str] = []
    bad_original: dict[str, str] = {}
    rows: list[int] = []  # row indices being scored
    edits: dict[str, list] = {side: [] for side in e_sides}
    for k, iid in enumerate(item_ids):
        if iid in bad_original:
            out[k] = rejected(iid, bad_original[iid], candidate=candidates[k])
            continue
        if iid not in items:
            try:
                decoded = {side: decode_image(images[side][k]) for side in o_sides}
            except BadImage as exc:
                bad_original[iid] = str(exc)
                out[k] = rejected(iid, str(exc), candidate=candidates[k])
                continue
            items[iid] = len(item_prompts)
            item_prompts.append(prompts[k])
            item_instructions.append(instructions[k] if instructions is not None else "")
            orig_digest.append(digest(images["original"][k]))
            for side in o_sides:
                originals[side].append(decoded[side])
        try:
            decoded = {side: decode_image(images[side][k]) for side in e_sides}
        except BadImage as exc:
            out[k] = rejected(iid, str(exc), candidate=candidates[k])
            continue
        rows.append(k)
        for side in e_sides:
            edits[side].append(decoded[side])
    if rows:
        owner = [items[item_ids[k]] for k in rows]
        row_prompts = [prompts[k] for k in rows]
        unparsed: dict[str, dict[int, str]] = {}
        orig_raw, edit_raw, dtypes = score_images(
            names, cfg, get_scorer, row_prompts, edits, owner, item_prompts, originals,
            instructions=None if instructions is None else [instructions[k] for k in rows],
            item_instructions=item_instructions, unparsed=unparsed)
        consistency = (subject_consistency(cfg, get_scorer, edits, owner, originals, row_prompts)
                       if cfg.subject_gate else None)
        for r, k in enumerate(rows):
            j = owner[r]
            values = {"candidate": candidates[k], "digest_0": orig_digest[j], "digest_1": digest(images["edited"][k]),
                      "dtypes": json.dumps(dtypes, sort_keys=True),
                      SUBJECT: None if consistency is None else float(consistency[r])}
            for name in names:
                values.update({f"{name}_0": float(orig_raw[name][j]), f"{name}_1": float(edit_raw[name][r])})
            unscored = [n for n in names if not (np.isfinite(orig_raw[n][j]) and np.isfinite(edit_raw[n][r]))]
            bad = consistency is not None and not np.isfinite(consistency[r])
            why = f"bad_score: non-finite {SUBJECT} score"
            # A reward's non-finite scores are recorded (NaN, and why); relabel rejects the pairs they decide.
            positions = (j, len(item_prompts) + r)
            values["unscored"] = "; ".join((unparsed_reason([n], unparsed, positions) or f"{n}: non-finite score")
                                           .removeprefix("unparsed_answer: ") for n in unscored) or None
            out[k] = rejected(item_ids[k], why, **values) if bad else kept(item_ids[k], **values)
    return rows_to_table([out[k] for k in range(n_rows)], reward_scores_schema(names))


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.score
    sample = inputs.lookup("sample", ["prompt", "image"])
    judges = needs_instructions(cfg)
    edit = inputs.lookup("edit", ["image", "edit_instructions"] if judges else ["image"])
    images = {"original": sample.column("image").to_pylist(), "edited": edit.column("image").to_pylist()}
    instructions = ([" ".join(s.strip() for s in (row or [])) for row in edit.column("edit_instructions").to_pylist()]
                    if judges else None)
    if needs_cutouts(cfg):
        cut = inputs.lookup("cutout", ["original_cutout", "edited_cutout"])
        images.update(original_cutout=cut.column("original_cutout").to_pylist(),
                      edited_cutout=cut.column("edited_cutout").to_pylist())
    return score_rows(inputs.rows.column("item_id").to_pylist(), sample.column("prompt").to_pylist(), images, cfg,
                      lambda name: load_scorer(name, cfg, profile.models_root),
                      candidates=inputs.rows.column("candidate").to_pylist(), instructions=instructions)


def needs_instructions(cfg: ScoreConfig) -> bool:
    """Whether an edit judge is scored: it reads each edit's instructions (the edit stage's)."""
    return any(REWARD_KINDS[cfg.rewards[n].kind].reads_instruction for n in cfg.scored())


def templates_key(profile: Profile) -> str:
    """The text of every VLM question a reward asks is part of the key, like the VLM stages' templates."""
    cfg = profile.score
    names = set()
    for n in cfg.scored():  # each template option of a judge: the one set, else the kind's default
        spec, defaults = cfg.rewards[n], REWARD_KINDS[cfg.rewards[n].kind].defaults
        names |= {getattr(spec, opt) or defaults[opt] for opt in TEMPLATE_OPTIONS if opt in defaults}
    names = sorted(names)
    return ",".join(f"{n}={template_hash(n)}" for n in names)


# Driven by the check stage's rows, not the filter's verdicts: every pair the VLM answered is scored,
# so a filter threshold can move without a reward model running again.
def reward_models(profile: Profile, gate: bool = True) -> list[ModelUse]:
    """The scored rewards' models and the subject gate's."""
    cfg, uses = profile.score, []
    for name in cfg.scored():
        spec = cfg.rewards[name]
        if spec.engine.weights_elsewhere:
            continue
        uses.append(ModelUse(f"score.rewards.{name}.model", spec.model, "reward", cfg,
                             spec.file or REWARD_KINDS[spec.kind].defaults.get("file")))
        uses += [ModelUse(f"score.rewards.{name}.{opt}", getattr(spec, opt), "reward", cfg) for opt in MODEL_REF_OPTIONS]
    if gate and cfg.subject_gate is not None:
        uses.append(ModelUse("score.subject_gate.model", cfg.subject_gate.model, "reward", cfg))
    return uses


def load_models(profile: Profile, gate: bool = True) -> list[str]:
    """Loads what the stage loads (the scored rewards, the subject gate) into its resident reward set."""
    cfg = profile.score
    rs = reward_set(cfg, profile.models_root)
    for name in cfg.scored():
        rs.get(name)
    loaded = [f"{n}:{cfg.rewards[n].kind}" for n in cfg.scored()]
    if gate and cfg.subject_gate is not None:
        rs.get(SUBJECT)
        loaded.append(f"{SUBJECT}:dino_patch")
    return loaded


STAGE = Stage(name="score", version="4", section="score", reads=("check", "sample", "edit", "cutout"),
              compute=compute, key_extra=templates_key, config_view=scoring_view,
              schema=lambda p: reward_scores_schema(p.score.scored()), models=reward_models, load=load_models)
