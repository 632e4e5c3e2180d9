"""Versioned prompt templates for the VLM stages. A template's text is part of its stage's cache key.

A template is named by its file's stem here (`hpsv3_v1`) or, where the docs say so (a reward's
`template`), by the path of a text file of the user's (any name holding '/' or ending in '.txt')."""
from __future__ import annotations

import hashlib
import re
from importlib import resources
from pathlib import Path


def is_path(name: str) -> bool:
    return "/" in name or name.endswith(".txt")


def load_template(name: str) -> str:
    if is_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"template file {name!r} not found: give an existing text file, or the name of "
                             "one of richpref/prompts/*.txt")
        return path.read_text(encoding="utf-8")
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"template name {name!r}: use lowercase letters, digits and '_' (or a text file's path)")
    path = resources.files(__package__) / f"{name}.txt"
    if not path.is_file():
        available = sorted(p.name[:-4] for p in resources.files(__package__).iterdir() if p.name.endswith(".txt"))
        raise ValueError(f"template {name!r} not found; available: {', '.join(available)}")
    return path.read_text(encoding="utf-8")


def load_sections(name: str) -> dict[str, str]:
    """A template file split into `[section]` blocks."""
    text = load_template(name)
    parts = re.split(r"^\[([a-z_]+)\]\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def template_hash(name: str) -> str:
    return hashlib.sha256(load_template(name).encode()).hexdigest()[:16]


def render(template: str, **values: object) -> str:
    """Fill `{name}` fields literally: values are data, never format specs or code."""
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"template needs {{{key}}}")
        return str(values[key])

    return re.sub(r"\{([a-z_]+)\}", sub, template)


REWARD_TOKEN = "<|Reward|>"  # where a reward-head judge (HPSv3, EditReward) reads its hidden state


def load_head_template(name: str) -> str:
    """A reward-head judge's prompt: a `{prompt}` field and the reward token exactly once."""
    text = load_template(name)
    fields = set(re.findall(r"\{([a-z_]+)\}", text))
    if fields != {"prompt"} or text.count(REWARD_TOKEN) != 1:
        raise ValueError(f"template {name!r} has fields {sorted(fields)} and {text.count(REWARD_TOKEN)} {REWARD_TOKEN}: "
                         f"a reward-head judge's template needs the field {{prompt}} (the caption or instruction) and "
                         f"{REWARD_TOKEN} once (where the score is read), nothing else in braces")
    return text
