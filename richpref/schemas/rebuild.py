"""What a profile with `pipeline: rebuild` (or `relabel_dataset`) must hold, and what the edit pipeline must not.

A rebuild regenerates a preference set from prompts alone: `sample.num_samples` images per prompt,
scored by `score.rewards`, paired by `relabel.pairing` (best_vs_worst | all_with_margin). It has no
original, no edit and no cut-out, so the settings that name them are refused here, before any model
loads, with the fix in the message.
"""
from __future__ import annotations

from typing import Any

from .relabel import EDIT_JUDGES

REBUILD_PAIRINGS = ("best_vs_worst", "all_with_margin")


def check_pipeline(profile: Any) -> None:
    """Raise ValueError naming the setting and the fix when the profile's sections do not fit its pipeline."""
    n = profile.sample.num_samples
    relabel, score = profile.relabel, profile.score
    if profile.pipeline == "relabel_dataset":
        problem = independent_pairs_problem(score, relabel)
        if problem:
            raise ValueError(problem)
        return
    if profile.pipeline == "edit":
        if n is not None and n > 1:
            raise ValueError(f"sample.num_samples is {n}: several samples per prompt are paired by the rebuild "
                             "pipeline; set `pipeline: rebuild` (or drop sample.num_samples)")
        if relabel.pairing == "all_with_margin":
            raise ValueError("relabel.pairing all_with_margin pairs samples of a prompt: it needs `pipeline: rebuild`; "
                             "the edit pipeline pairs with best_vs_original or best_vs_worst")
        return
    if n is None or n < 2:
        raise ValueError(f"pipeline rebuild pairs samples of a prompt: set sample.num_samples to 2 or more (it is {n})")
    if relabel.pairing not in REBUILD_PAIRINGS:
        raise ValueError(f"relabel.pairing {relabel.pairing!r} pairs an edit with its original; a rebuild has no "
                         f"original: set relabel.pairing to one of {', '.join(REBUILD_PAIRINGS)}")
    if score.subject_gate is not None:
        raise ValueError("score.subject_gate compares an edit with its original; a rebuild has neither: "
                         "remove score.subject_gate")
    cut = [name for name in score.scored() if score.rewards[name].on_cutout]
    if cut:
        raise ValueError(f"reward(s) {cut} score cut-outs; a rebuild makes none: set on_cutout: false")
    if profile.source.image_column or profile.source.pickapic_preferred:
        raise ValueError("a rebuild samples every image from the prompt: unset source.image_column and "
                         "source.pickapic_preferred (a prompt-only set such as Pick-a-Pic v2 no-images needs neither)")


def independent_pairs_problem(score: Any, relabel: Any) -> str | None:
    """Why score and relabel configs cannot score a Pick-a-Pic pair (two independent images, nothing
    edited, no cut-out), with the fix; None when they can (`pipeline: relabel_dataset`, richpref relabel-dataset)."""
    unfit = [n for n in score.scored() if score.rewards[n].on_cutout]
    if unfit:
        return (f"reward(s) {unfit} score cut-outs of an edit and its original; a Pick-a-Pic pair has "
                "two independent images and no cut-outs: pick a full-image reward with --reward")
    judges = [n for n in score.scored() if score.rewards[n].kind in EDIT_JUDGES]
    if judges:
        return (f"reward(s) {judges} judge an edit against its original and instructions; a Pick-a-Pic "
                "pair has two independent images: pick an image reward with --reward")
    if relabel.standardize == "item":
        return ("relabel.standardize=item groups an original with its edits; a Pick-a-Pic pair has two "
                "independent images: use relabel.standardize=shard (--set relabel.standardize=shard)")
    if score.subject_gate is not None or relabel.edit_gate is not None:
        return "score.subject_gate and relabel.edit_gate judge an edit; a Pick-a-Pic pair has none: remove them"
    return None
