"""The curate stages, in pipeline order. Each module: a pure function over a shard + its Stage."""
from . import (check, critique, cutout, edit, export, filter, instruct, pickapic_relabel, pickapic_source,
               rebuild_export, rebuild_pair, rebuild_score, rebuild_sample, relabel, sample, score)
from .base import Stage
from ..schemas.config import ProfileError

PIPELINE: tuple[Stage, ...] = (
    sample.STAGE,
    critique.STAGE,
    instruct.STAGE,
    edit.STAGE,
    cutout.STAGE,
    check.STAGE,  # the VLM's answers as probabilities
    filter.STAGE,  # thresholds: keep or drop, no model call
    score.STAGE,  # the reward models' raw scores
    relabel.STAGE,  # weights, gate, pairing, ties: no model call
    export.STAGE,
)
STAGES: dict[str, Stage] = {s.name: s for s in PIPELINE}
# Folders of a run in pipeline order (export writes `pairs`).
OUTPUTS: tuple[str, ...] = ("source",) + tuple(s.out for s in PIPELINE)

from . import source  # noqa: E402 - the source, an ordinary stage that reads no stage

# Every stage the curate flow runs, in order: the source first.
ALL_STAGES: tuple[Stage, ...] = (source.STAGE, *PIPELINE)

# `pipeline: rebuild`: prompts -> sample.num_samples images -> rewards -> ranked pairs -> Pick-a-Pic.
REBUILD: tuple[Stage, ...] = (source.STAGE, rebuild_sample.STAGE, rebuild_score.STAGE, rebuild_pair.STAGE,
                              rebuild_export.STAGE)
REBUILD_OUTPUTS: tuple[str, ...] = tuple(s.out for s in REBUILD)
# `pipeline: relabel_dataset` (richpref relabel-dataset): a Pick-a-Pic dataset's pairs -> raw scores ->
# labels -> Pick-a-Pic. Its folders are the edit pipeline's source, score, relabel and pairs.
RELABEL_DATASET: tuple[Stage, ...] = (pickapic_source.STAGE, pickapic_relabel.SCORE, pickapic_relabel.RELABEL,
                                      pickapic_relabel.EXPORT)
# Every folder either pipeline writes, in pipeline order (the views of `richpref inspect`).
ALL_OUTPUTS: tuple[str, ...] = OUTPUTS[:-1] + REBUILD_OUTPUTS[1:]
# Views keyed by something other than an item's images (ranked: a pair index): not joined into pairs_full.
PAIR_KEYED: frozenset[str] = frozenset({rebuild_pair.STAGE.out})


def stages_for(profile, until: str | None = None) -> tuple[Stage, ...]:
    """The stages a profile's `pipeline` runs, in order (the source first), up to the stage named
    `until` (a `--until` run; None: all of them), or the stage writing the table it names (`pairs`, as
    status and inspect call it: the export stage)."""
    stages = {"rebuild": REBUILD, "relabel_dataset": RELABEL_DATASET}.get(profile.pipeline, ALL_STAGES)
    if until is None:
        return stages
    names = [s.name for s in stages]
    last = until if until in names else {s.out: s.name for s in stages}.get(until)
    if last is None:
        raise ProfileError(f"--until {until}: profile {profile.name!r} ({profile.pipeline} pipeline) runs {', '.join(names)}")
    return stages[: names.index(last) + 1]


def table_schemas(profile) -> dict:
    """The table schema of each folder a profile's run writes, in pipeline order (each stage declares its own)."""
    return {s.out: s.output_schema(profile) for s in stages_for(profile)}
