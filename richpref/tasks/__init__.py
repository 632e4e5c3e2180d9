"""The curate stages, in pipeline order. Each module: a pure function over a shard + its Stage."""
from . import critique, cutout, edit, export, filter, filter_check, instruct, relabel, relabel_score, sample
from .base import Stage

PIPELINE: tuple[Stage, ...] = (
    sample.STAGE,
    critique.STAGE,
    instruct.STAGE,
    edit.STAGE,
    cutout.STAGE,
    filter_check.STAGE,  # the VLM's answers as probabilities
    filter.STAGE,  # thresholds: keep or drop, no model call
    relabel_score.STAGE,  # the reward models' raw scores
    relabel.STAGE,  # weights, gate, pairing, ties: no model call
    export.STAGE,
)
STAGES: dict[str, Stage] = {s.name: s for s in PIPELINE}
# Folders of a run in pipeline order (export writes `pairs`).
OUTPUTS: tuple[str, ...] = ("source",) + tuple(s.out for s in PIPELINE)

from . import source  # noqa: E402 - the source, an ordinary stage that reads no stage

# Every stage the curate flow runs, in order: the source first.
ALL_STAGES: tuple[Stage, ...] = (source.STAGE, *PIPELINE)
