"""The README and docs/ name only what exists: every flag of a `richpref …` command line is one of that
command's options (richpref/cli), and every profile key written `section.key` is a field of the profile
(richpref/schemas). A renamed option or a key moved to another section shows here, not in a newcomer's
first `--set`."""
from __future__ import annotations

import argparse
import re
import typing
from pathlib import Path

import pydantic

from richpref.cli.commands import build_parser
from richpref.schemas.config import Profile

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:^|[`\s(/])richpref((?:[ \t]+--?[\w-]+(?:[= ][^\s`]+)?)*)[ \t]+([a-z][\w-]*)"
                     r"((?:[ \t]+[^\s`|;&)]+)*)", re.M)
KEY = re.compile(r"`([a-z_]+(?:\.[a-z_0-9]+)+)(?:[:=][^`]*)?`")
# Written on purpose: the profile layout before a change, described as such.
FORMER_KEYS = {"relabel.rewards"}
FILE_SUFFIXES = (".json", ".jsonl", ".md", ".yaml", ".parquet", ".png", ".py", ".txt", ".toml")


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def test_every_flag_of_a_documented_command_is_an_option_of_it():
    parser = build_parser()
    commands, top = _subcommands(parser), _options(parser)
    unknown, checked = [], 0
    for doc in DOCS:
        for m in COMMAND.finditer(doc.read_text(encoding="utf-8").replace("\\\n", " ")):
            before, name, rest = m.groups()
            if name not in commands:  # prose: "richpref starts …"
                continue
            sub, words = commands[name], rest.split()
            if words and words[0] in _subcommands(sub):  # richpref models build-tiny …
                sub, words = _subcommands(sub)[words[0]], words[1:]
            known = _options(sub) | top
            flags = [w.split("=")[0] for w in words if w.startswith("--")] + [
                w.split("=")[0] for w in before.split() if w.startswith("--")]
            checked += len(flags)
            unknown += [f"{doc.name}: richpref {name} {flag}" for flag in flags if flag not in known]
    assert checked > 50 and not unknown, unknown


def _section_model(annotation) -> type[pydantic.BaseModel] | None:
    todo = [annotation]
    while todo:
        a = todo.pop()
        if isinstance(a, type) and issubclass(a, pydantic.BaseModel):
            return a
        todo += typing.get_args(a)
    return None


def _is_field(path: list[str]) -> bool:
    model: type[pydantic.BaseModel] | None = Profile
    for part in path:
        if model is None:  # a value inside a dict or list field (score.rewards.<name>.…)
            return True
        if part not in model.model_fields:
            return False
        model = _section_model(model.model_fields[part].annotation)
    return True


def test_every_documented_profile_key_is_a_field_of_the_profile():
    sections = set(Profile.model_fields)
    unknown, checked = [], 0
    for doc in DOCS:
        for m in KEY.finditer(doc.read_text(encoding="utf-8")):
            key = m.group(1)
            if key.split(".")[0] not in sections or key in FORMER_KEYS or key.endswith(FILE_SUFFIXES):
                continue
            checked += 1
            if not _is_field(key.split(".")):
                unknown.append(f"{doc.name}: {key}")
    assert checked > 50 and not unknown, unknown
