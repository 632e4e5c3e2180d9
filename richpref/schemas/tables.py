"""Arrow schemas of every table a run writes.

Every table has `item_id` (the join key across stages) and `status`/`reason`: a stage writes one row
per input row, kept (`status == "ok"`) or rejected (`status == "rejected"`, `reason` says why), so the
counts of every stage add up. The edit stage writes `edit.num_edits` rows per item, one per
`candidate` (0, 1, …); the stages after it keep `candidate`, so their key is (`item_id`, `candidate`).
Images are encoded bytes (PNG) in binary columns: a shard is self-contained, queryable with duckdb
and loadable with `datasets`.
"""
from __future__ import annotations

import pyarrow as pa

OK = "ok"
REJECTED = "rejected"

_COMMON = [
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
]


def _schema(*fields: pa.Field) -> pa.Schema:
    return pa.schema(_COMMON + list(fields))


PROMPTS = _schema(
    pa.field("source", pa.string()),
    pa.field("source_row", pa.int64()),
    pa.field("prompt", pa.string()),
    pa.field("image", pa.binary()),  # given image (e.g. Pick-a-Pic's preferred one), else null
)

SAMPLES = _schema(
    pa.field("prompt", pa.string()),
    pa.field("image", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("seed", pa.int64()),
    pa.field("origin", pa.string()),  # "generated" or "dataset"
    pa.field("model_id", pa.string()),
)

CRITIQUES = _schema(
    pa.field("prompt", pa.string()),
    pa.field("critique", pa.string()),
    pa.field("raw", pa.string()),
    pa.field("template", pa.string()),
    pa.field("model_id", pa.string()),
)

INSTRUCTIONS = _schema(
    pa.field("prompt", pa.string()),
    pa.field("instructions", pa.list_(pa.string())),
    pa.field("dropped_instructions", pa.list_(pa.string())),  # parsed but removed by a guard
    pa.field("drop_reasons", pa.list_(pa.string())),  # one `code: detail` per dropped instruction
    pa.field("truncated", pa.bool_()),  # max_new_tokens cut the model's output
    pa.field("raw", pa.string()),
    pa.field("template", pa.string()),
    pa.field("model_id", pa.string()),
    # where the visibility P(yes) came from: "logits" (in-process), "logprobs" (server) or "answer"
    # (a server's one-token answer, P is 0 or 1); null when no instruction was checked
    pa.field("visible_source", pa.string()),
)

CANDIDATE = pa.field("candidate", pa.int32(), nullable=False)  # which of an item's edits (0 .. num_edits-1)

EDITS = _schema(
    CANDIDATE,
    pa.field("edit_prompt", pa.string()),
    pa.field("image", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("seed", pa.int64()),
    pa.field("control", pa.string()),
    pa.field("pixel_change", pa.float64()),  # mean |edited - original| / 255
    pa.field("model_id", pa.string()),
    pa.field("editor", pa.string()),  # edit.kind: controlnet_img2img, instruct_pix2pix, flux_kontext, ...
    # The instructions that reached the editor's text encoders whole, those that did not (past the
    # token limit: `edit.long_prompt`), and why (tasks/edit_prompts.py).
    pa.field("edit_instructions", pa.list_(pa.string())),
    pa.field("dropped_instructions", pa.list_(pa.string())),
    pa.field("prompt_note", pa.string()),
)

CUTOUTS = _schema(
    CANDIDATE,
    pa.field("original_cutout", pa.binary()),
    pa.field("edited_cutout", pa.binary()),
    pa.field("original_mask", pa.binary()),  # rembg's soft foreground mask, PNG mode "L" (255 = foreground)
    pa.field("edited_mask", pa.binary()),
    pa.field("original_fg_ratio", pa.float64()),
    pa.field("edited_fg_ratio", pa.float64()),
    pa.field("model_id", pa.string()),
)

CHECKS = _schema(  # the VLM's answers to the filter's questions; the thresholds are applied in VERDICTS
    CANDIDATE,
    pa.field("p_executed_each", pa.list_(pa.float64())),  # per instruction, same order
    pa.field("p_no_stray", pa.float64()),
    pa.field("p_subject_kept", pa.float64()),
    pa.field("attributes", pa.list_(pa.string())),  # null when the attribute check is off
    pa.field("attributes_raw", pa.string()),
    pa.field("attributes_error", pa.string()),  # why no attribute could be read, else null
    pa.field("p_attr_original", pa.list_(pa.float64())),
    pa.field("p_attr_edited", pa.list_(pa.float64())),
    pa.field("template", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("p_source", pa.string()),  # "logits" (in-process), "logprobs" (server) or "answer" (P is 0 or 1)
)

VERDICTS = _schema(
    CANDIDATE,
    pa.field("p_executed", pa.float64()),
    pa.field("p_no_stray", pa.float64()),
    pa.field("p_subject_kept", pa.float64()),
    pa.field("p_executed_each", pa.list_(pa.float64())),  # per instruction, same order
    pa.field("attributes", pa.list_(pa.string())),  # key attributes listed from the original cut-out
    pa.field("p_attr_original", pa.list_(pa.float64())),  # P(attribute present), original cut-out
    pa.field("p_attr_edited", pa.list_(pa.float64())),  # P(attribute present), edited cut-out
    pa.field("attr_exempt", pa.list_(pa.bool_())),  # named by an instruction: expected to change
    pa.field("attributes_kept", pa.float64()),  # share of checked attributes still present; null if none
    pa.field("attributes_raw", pa.string()),
    pa.field("checks", pa.string()),  # JSON: check -> "pass" | "fail: …" | "skipped: …"
    pa.field("verdict", pa.string()),  # "keep" or "drop"
    pa.field("template", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("p_source", pa.string()),  # "logits" (in-process), "logprobs" (server) or "answer" (P is 0 or 1)
)

def reward_scores_schema(rewards: list[str]) -> pa.Schema:
    """What the reward models measured, one row per edit candidate: per reward the raw score of the
    item's original (`_0`) and of the edit (`_1`), the DINOv2 consistency of the edit with its original
    (null without `score.subject_gate`), a digest of each image's bytes (identical images are a tie)
    and the dtype each reward computed in (JSON). Nothing decided: that is the relabel stage's job."""
    fields = [CANDIDATE]
    for name in rewards:
        fields += [pa.field(f"{name}_0", pa.float64()), pa.field(f"{name}_1", pa.float64())]
    return _schema(*fields, pa.field("subject_consistency", pa.float64()), pa.field("digest_0", pa.string()),
                   pa.field("digest_1", pa.string()), pa.field("dtypes", pa.string()),
                   pa.field("unscored", pa.string()))  # rewards with no score (NaN) on a row, and why


def scores_schema(rewards: list[str]) -> pa.Schema:
    """One row per edit candidate. Sides 0 and 1 are the images `candidate_0` and `candidate_1`
    (-1 = the original, k = edit candidate k): the candidate's own comparison with the original, or,
    on the row that carries the item's pair, the pair chosen by `relabel.pairing`. One raw and one
    standardised column per reward and side."""
    fields = [CANDIDATE,
              pa.field("candidate_0", pa.int32()),
              pa.field("candidate_1", pa.int32())]
    for name in rewards:
        fields += [
            pa.field(f"{name}_0", pa.float64()),
            pa.field(f"{name}_1", pa.float64()),
            pa.field(f"{name}_z0", pa.float64()),
            pa.field(f"{name}_z1", pa.float64()),
        ]
    return _schema(
        *fields,
        pa.field("subject_consistency", pa.float64()),  # DINOv2 consistency of candidate_1 with the original
        pa.field("composite_0", pa.float64()),
        pa.field("composite_1", pa.float64()),
        pa.field("margin", pa.float64()),  # |composite_1 - composite_0|
        pa.field("chosen", pa.int8()),  # 0 = original preferred, 1 = edited preferred
        pa.field("flipped", pa.bool_()),  # the edit scored lower than the original
    )


PAIRS_BASE = [
    pa.field("caption", pa.string(), nullable=False),
    pa.field("jpg_0", pa.binary(), nullable=False),  # the original, or the lower-numbered edit (encoded bytes)
    pa.field("jpg_1", pa.binary(), nullable=False),  # an edit
    pa.field("label_0", pa.int64(), nullable=False),  # 1 = jpg_0 preferred, 0 = jpg_1 preferred; never 0.5
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("critique", pa.string()),
    pa.field("instructions", pa.list_(pa.string())),
    pa.field("edit_prompt", pa.string()),
    pa.field("candidate_0", pa.int32()),  # -1 = the original, k = edit candidate k
    pa.field("candidate_1", pa.int32()),
    pa.field("margin", pa.float64()),
    pa.field("flipped", pa.bool_()),
    pa.field("scores", pa.string()),  # JSON: every raw and standardised score of both images
    pa.field("model_ids", pa.string()),  # JSON: stage -> model id
    pa.field("config_hash", pa.string()),
    pa.field("editor", pa.string()),  # the edit.kind that made jpg_1
    # Where jpg_0 and jpg_1 differ: PNG, mode "L", 0 = unchanged, 255 = changed, their width/height;
    # null when not computable (richpref/tasks/pair_images.py).
    pa.field("edit_mask", pa.binary()),
]
PAIRS = pa.schema(PAIRS_BASE)

# The rebuild pipeline (`pipeline: rebuild`): `sample.num_samples` images per prompt, keyed
# (item_id, candidate = sample index); then one row per possible pair of an item's samples, keyed
# (item_id, candidate = pair index p of (candidate_0, candidate_1), candidate_0 < candidate_1, in
# order (0,1), (0,2), …, (1,2), …).
REBUILD_SAMPLES = pa.schema(list(SAMPLES) + [CANDIDATE])


def sample_scores_schema(rewards: list[str]) -> pa.Schema:
    """One row per sample: the raw score under every scored reward, a digest of the image's bytes and
    the dtype each reward ran in (JSON). Nothing decided."""
    return _schema(CANDIDATE, *[pa.field(name, pa.float64()) for name in rewards],
                   pa.field("seed", pa.int64()), pa.field("digest", pa.string()), pa.field("dtypes", pa.string()))


def ranked_schema(rewards: list[str]) -> pa.Schema:
    """One row per possible pair of an item's samples: raw and z-scored rewards of both sides, their
    composites, the margin and `chosen` (0: candidate_0 preferred, 1: candidate_1) of a kept pair."""
    fields = [CANDIDATE, pa.field("candidate_0", pa.int32()), pa.field("candidate_1", pa.int32()),
              pa.field("seed_0", pa.int64()), pa.field("seed_1", pa.int64())]
    for name in rewards:
        fields += [pa.field(f"{name}_0", pa.float64()), pa.field(f"{name}_1", pa.float64()),
                   pa.field(f"{name}_z0", pa.float64()), pa.field(f"{name}_z1", pa.float64())]
    return _schema(*fields, pa.field("composite_0", pa.float64()), pa.field("composite_1", pa.float64()),
                   pa.field("margin", pa.float64()), pa.field("chosen", pa.int8()), pa.field("flipped", pa.bool_()))


# A rebuild's pairs: the Pick-a-Pic columns and provenance of PAIRS (critique, instructions,
# edit_prompt, editor and edit_mask null: nothing was edited) plus the pair index and both seeds.
REBUILD_PAIRS = pa.schema(PAIRS_BASE + [CANDIDATE, pa.field("seed_0", pa.int64()), pa.field("seed_1", pa.int64())])

def empty_rows(schema: pa.Schema) -> dict[str, list]:
    return {name: [] for name in schema.names}


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table from row dicts; a missing column in a row is null (rejected rows carry little)."""
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(cols, schema=schema)
