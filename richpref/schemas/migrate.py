"""One-release migration of profiles written before each stage had its own section.

Until this release `filter:` also held the check stage's settings (its VLM, template, attribute
questions). A profile (YAML, `extends:` base or `section.key=value` override) that still puts them
there loads: each key moves to its new place and one warning per load names every move. The next
release refuses the old form.
"""
from __future__ import annotations

import warnings

from .stages.check import CheckConfig

# old section -> {key -> new section}: the keys a section gave to a stage of its own.
MOVED: dict[str, dict[str, str]] = {
    "filter": {k: "check" for k in CheckConfig.model_fields if k != "attributes"},
}


class ProfileMigrationWarning(FutureWarning):
    """A profile in the layout of the previous release: loaded, but refused by the next one."""


def move_override(dotted: str) -> tuple[str, str | None]:
    """`filter.model` -> (`check.model`, why); a key in its place -> (itself, None)."""
    section, _, rest = dotted.partition(".")
    key = rest.split(".", 1)[0]
    new = MOVED.get(section, {}).get(key)
    if new is None:
        return dotted, None
    return f"{new}.{rest}", f"{dotted} is now {new}.{rest}"


def move_sections(data: dict, where: str) -> list[str]:
    """Move the old-layout keys of `data` (one profile file's or a saved profile's sections) in place;
    the notes name each move. A key given in both places is refused: which one was meant is unknown."""
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
    return notes


def migrate(data: dict, where: str) -> list[str]:
    """A whole profile's data (after `extends:` and overrides): the moves, then what changed meaning."""
    return move_sections(data, where) + (attributes_off(data) if isinstance(data, dict) else [])


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
    """One warning per profile load, naming every move."""
    if notes:
        warnings.warn(f"profile {where} uses the previous layout ({'; '.join(dict.fromkeys(notes))}); it loads this "
                      "release, the next release refuses the old form: move the keys", ProfileMigrationWarning,
                      stacklevel=3)
