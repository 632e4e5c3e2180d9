"""One-release migration of profiles written before each stage had its own section.

Until this release `filter:` also held the check stage's settings (its VLM, template, attribute
questions) and `relabel:` the score stage's (the reward models, the subject gate's DINOv2, the
dtype), each reward's weight inside its model's spec. A profile (YAML, `extends:` base or
`section.key=value` override) that still puts them there loads: each key moves to its new place and
one warning per load names every move. The next release refuses the old form.
"""
from __future__ import annotations

import warnings

from .stages.check import CheckConfig

# old section -> {key -> new section}: the keys a section gave to a stage of its own.
MOVED: dict[str, dict[str, str]] = {
    "filter": {k: "check" for k in CheckConfig.model_fields if k != "attributes"},
    "relabel": {k: "score" for k in ("dtype", "batch_size", "device")},
}


class ProfileMigrationWarning(FutureWarning):
    """A profile in the layout of the previous release: loaded, but refused by the next one."""


def move_override(dotted: str) -> tuple[str, str | None]:
    """`filter.model` -> (`check.model`, why); a key in its place -> (itself, None). A whole old
    block (`relabel.rewards=…`) stays: the profile's migration splits it."""
    section, _, rest = dotted.partition(".")
    parts = rest.split(".")
    new = MOVED.get(section, {}).get(parts[0])
    if new is not None:
        moved = f"{new}.{rest}"
    elif section == "relabel" and parts[0] == "rewards" and len(parts) >= 3:
        moved = f"relabel.weights.{parts[1]}" if parts[2:] == ["weight"] else f"score.{rest}"
    elif section == "relabel" and parts[0] == "subject_gate" and len(parts) >= 2:
        moved = "relabel.min_consistency" if parts[1:] == ["min_consistency"] else f"score.{rest}"
    else:
        return dotted, None
    return moved, f"{dotted} is now {moved}"


def move_sections(data: dict, where: str, strict: bool = True) -> list[str]:
    """Move the old-layout keys of `data` (one profile file's or a saved profile's sections) in place;
    the notes name each move. A key given in both places is refused: which one was meant is unknown
    (unless not `strict`: a whole old block given as an override replaces the new one)."""
    notes: list[str] = []
    if not isinstance(data, dict):
        return notes
    for old, keys in MOVED.items():
        section = data.get(old)
        if not isinstance(section, dict):
            continue
        for key in [k for k in section if k in keys]:
            new = keys[key]
            target = data.setdefault(new, {})
            if not isinstance(target, dict):
                raise ValueError(f"{where}: {new} is not a section")
            if key in target:
                raise ValueError(f"{where}: {old}.{key} and {new}.{key} are both set; {key} belongs in {new}: "
                                 f"remove {old}.{key}")
            target[key] = section.pop(key)
            notes.append(f"{old}.{key} is now {new}.{key}")
    return notes + split_relabel(data, where, strict)


def migrate(data: dict, where: str) -> list[str]:
    """A whole profile's data (after `extends:` and overrides): the moves, then what changed meaning."""
    return move_sections(data, where, strict=False) + (attributes_off(data) if isinstance(data, dict) else [])


def split_relabel(data: dict, where: str, strict: bool) -> list[str]:
    """relabel.rewards / report_only / subject_gate of the previous layout: what the score stage
    measures moves to score:, the votes and the gate's threshold stay in relabel: (weights,
    min_consistency). `strict` (one file): the same setting in both layouts is refused."""
    rel = data.get("relabel")
    if not isinstance(rel, dict) or not {"rewards", "report_only", "subject_gate"} & set(rel):
        return []
    score = data.setdefault("score", {})
    if not isinstance(score, dict):
        raise ValueError(f"{where}: score is not a section")
    notes = []
    only = rel.pop("report_only", None)
    if "rewards" in rel:
        rewards = rel.pop("rewards") or {}
        if strict and "rewards" in score:
            raise ValueError(f"{where}: relabel.rewards and score.rewards are both set; the rewards belong in score: "
                             "remove relabel.rewards")
        specs, weights = {}, {}
        for name, spec in rewards.items():
            spec = dict(spec or {})
            weight = spec.pop("weight", 1.0)
            if weight == 0 and name not in (only or []):
                notes.append(f"relabel.rewards.{name} (weight 0, not in report_only) was never scored: left out")
                continue
            specs[name] = spec
            if weight != 0:
                weights[name] = weight
        score["rewards"] = specs
        rel["weights"] = weights
        notes.append("relabel.rewards is now score.rewards (the models) and relabel.weights (the votes; a reward "
                     "not named there, as one in relabel.report_only, is recorded without a vote)")
    elif only is not None:  # report_only alone (an override): those rewards stop voting
        weights = rel.get("weights")
        if weights is None:
            weights = {n: 1.0 for n in score.get("rewards") or {}}
        rel["weights"] = {n: w for n, w in weights.items() if n not in only}
        notes.append("relabel.report_only is gone: a reward of score.rewards not named in relabel.weights is "
                     "recorded without a vote")
    if "subject_gate" in rel:
        gate = rel.pop("subject_gate")
        if strict and "subject_gate" in score:
            raise ValueError(f"{where}: relabel.subject_gate and score.subject_gate are both set: remove relabel.subject_gate")
        if isinstance(gate, dict):
            gate = dict(gate)
            if "min_consistency" in gate:
                rel["min_consistency"] = gate.pop("min_consistency")
            score["subject_gate"] = {**(score.get("subject_gate") or {}), **gate}
        else:
            score["subject_gate"] = gate
        notes.append("relabel.subject_gate is now score.subject_gate (the DINOv2) and relabel.min_consistency "
                     "(the threshold)")
    return notes


def attributes_off(data: dict) -> list[str]:
    """`filter.min_attributes_kept: 0` used to stop the check stage asking the attribute questions;
    now `check.attributes: false` does. A profile that sets the first and not the second gets both."""
    filt, check = data.get("filter"), data.get("check")
    if not isinstance(filt, dict) or filt.get("min_attributes_kept") != 0:
        return []
    if isinstance(check, dict) and "attributes" in check:
        return []
    data.setdefault("check", {})["attributes"] = False
    return ["filter.min_attributes_kept=0 no longer stops the check stage asking the attribute questions: "
            "set check.attributes: false (set for this load)"]


def warn_moved(notes: list[str], where: str) -> None:
    """One warning per profile load, naming every move; `where` names what holds the old keys."""
    if notes:
        warnings.warn(f"{where} of the previous layout ({'; '.join(dict.fromkeys(notes))}); it loads this "
                      "release, the next release refuses the old form: move the keys", ProfileMigrationWarning,
                      stacklevel=3)
