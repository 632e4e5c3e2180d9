"""Why a profile or config does not validate, in the user's terms: each problem names its key, says
whether the command's `--set` gave it, and for an unknown key offers the nearest known ones."""
from __future__ import annotations

import difflib
import types
import typing

from pydantic import BaseModel, ValidationError


def invalid_message(what: str, path, exc: ValueError, model: type[BaseModel], overrides: list[str] | None = None) -> str:
    """"<what> <path> is invalid:" (with its --set values, when there were some: the file alone may be
    fine) and one line per problem."""
    given = " with its --set values" if overrides else ""
    return f"{what} {path}{given} is invalid:\n{describe_invalid(exc, model, overrides)}"


def describe_invalid(exc: ValueError, model: type[BaseModel], overrides: list[str] | None = None) -> str:
    """One line per problem of `exc` (validating `model`), or `exc`'s own text when it is no
    ValidationError (a key given in both layouts)."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    given = {o.split("=", 1)[0].strip(): o for o in overrides or [] if "=" in o}
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        key = ".".join(loc) or "(top level)"
        origin = _override_of(loc, given)
        where = f" (--set {origin})" if origin else ""
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(loc[-1], _known_keys(model, err["loc"][:-1]), n=2, cutoff=0.7)
            hint = f"; did you mean {' or '.join('.'.join([*loc[:-1], k]) for k in near)}?" if near else ""
            lines.append(f"- {key}{where}: no such key{hint}")
        else:
            scalar = not isinstance(err.get("input"), (dict, list))  # a section's whole text says nothing more
            value = f" (is {_short(err.get('input'))})" if scalar and not origin and err["type"] != "missing" else ""
            lines.append(f"- {key}{where}: {err['msg'].removeprefix('Value error, ')}{value}")
    return "\n".join(lines)


def _override_of(loc: list[str], given: dict[str, str]) -> str | None:
    """The --set that set this key, or a section above it (`--set edit={...}`); for a check of a whole
    section, the --sets of keys inside it (`--set edit.kind=...` against the profile's other edit keys)."""
    for n in range(len(loc), 0, -1):
        if ".".join(loc[:n]) in given:
            return given[".".join(loc[:n])]
    inside = [o for k, o in given.items() if loc and k.startswith(".".join(loc) + ".")]
    return ", --set ".join(inside) or None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _known_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """The keys the section at `path` takes (every variant's, for a union of sections)."""
    models = [model]
    for part in path:
        inner = []
        for m in models:
            field = m.model_fields.get(part) if isinstance(part, str) else None
            if field is not None:
                inner += _models_in(field.annotation)
            elif not isinstance(part, str) or part not in m.model_fields:
                inner.append(m)  # a list index or a mapping key: the item's section is the same
        models = [m for m in inner if isinstance(m, type) and issubclass(m, BaseModel)]
        if not models:
            return []
    keys = {name for m in models for name, f in m.model_fields.items()} | {
        f.alias for m in models for f in m.model_fields.values() if f.alias}
    return sorted(keys)


def _models_in(annotation) -> list:
    """The sections an annotation may hold: X, X | None, list[X], dict[str, X], unions of those."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, set):
        return [m for a in args for m in _models_in(a)]
    if origin is dict and args:
        return _models_in(args[-1])
    return []
