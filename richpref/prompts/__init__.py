"""Versioned prompt templates for the VLM stages. A template's text is part of its stage's cache key."""
from __future__ import annotations

import hashlib
import re
from importlib import resources


def load_template(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"template name {name!r}: use lowercase letters, digits and '_'")
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
