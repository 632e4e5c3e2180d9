"""One declaration per reward kind (richpref/schemas/rewards/): the config's allowed kinds and options,
the loader table, the score key's template defaults and the tiny models' layout all come from it, and
no other module lists the kinds."""
from __future__ import annotations

import ast
import importlib
import inspect
import sys
import typing
from pathlib import Path

import pytest

from richpref.schemas import rewards as reward_decls
from richpref.schemas.rewards import REWARD_KINDS

ROOT = Path(__file__).resolve().parents[2]


def test_the_config_allows_exactly_the_declared_kinds(tmp_path):
    from richpref.schemas.config import ProfileError, load_profile
    from richpref.schemas.relabel import REWARD_OPTIONS, RewardSpec

    assert typing.get_args(RewardSpec.model_fields["kind"].annotation) == tuple(REWARD_KINDS)
    assert REWARD_OPTIONS == {k: d.allowed for k, d in REWARD_KINDS.items()}
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: tiny\nscore:\n  rewards:\n    r: {kind: imagerewrd, model: x}\n")
    with pytest.raises(ProfileError) as err:
        load_profile(str(bad))
    assert "imagerewrd" in str(err.value)
    assert all(f"'{k}'" in str(err.value) for k in REWARD_KINDS)  # the error names every allowed kind


def test_the_loader_table_is_the_declarations():
    from richpref.models.rewards import KINDS, PAIR_KINDS, REGISTRY

    assert KINDS == tuple(REWARD_KINDS)
    assert {k: opts for k, (_, opts) in REGISTRY.items()} == {k: d.options for k, d in REWARD_KINDS.items()}
    assert set(PAIR_KINDS) == {k for k, d in REWARD_KINDS.items() if d.pairwise}


def _loader(decl):
    module, attr = decl.loader.split(":")
    return getattr(importlib.import_module(f"richpref.models.rewards.{module}"), attr)


@pytest.mark.parametrize("kind", list(REWARD_KINDS))
def test_a_declaration_fits_its_scorer(kind):
    """The loader exists and takes every declared option; a declared default is the scorer's own (or the
    scorer reads it from the declaration when its argument defaults to None)."""
    from richpref.schemas.relabel import RewardSpec

    decl = REWARD_KINDS[kind]
    params = inspect.signature(_loader(decl)).parameters
    for opt in (*decl.options, *decl.fixed):
        assert opt in params, f"{decl.loader} takes no {opt!r}"
    for opt in decl.options:
        assert opt in RewardSpec.model_fields, f"{kind}: option {opt!r} is not a RewardSpec field"
    for opt, value in decl.defaults.items():
        assert opt in decl.options
        assert params[opt].default in (value, None), f"{kind}: {opt} defaults to {params[opt].default!r}, declared {value!r}"


def test_every_kind_has_a_tiny_twin_in_the_layout(paths):
    from richpref.models.tiny import LAYOUT

    for kind, decl in REWARD_KINDS.items():
        assert decl.tiny is not None, f"{kind} has no tiny twin"
        assert (paths.root / LAYOUT[decl.tiny.key]).is_dir(), kind
        if decl.tiny.build:  # else a model the tiny set builds anyway (the tiny CLIP, the tiny Qwen2.5-VL)
            assert LAYOUT[decl.tiny.key] == decl.tiny.path
            module, name = decl.tiny.build.split(":")
            assert callable(getattr(importlib.import_module(f"richpref.models.tiny.{module}"), name))


def test_a_new_declaration_module_is_found(tmp_path, monkeypatch):
    """Adding a reward kind is adding a module here: discovery walks the package."""
    pkg = tmp_path / "extra"
    pkg.mkdir()
    (pkg / "my_reward.py").write_text("from richpref.schemas.rewards import RewardKind\n"
                                      "KINDS = (RewardKind('my_reward', 'my_reward:MyReward', ('file',)),)\n")
    monkeypatch.setattr(reward_decls, "__path__", [*reward_decls.__path__, str(pkg)])
    try:
        found = reward_decls._discover()
    finally:
        sys.modules.pop("richpref.schemas.rewards.my_reward", None)
    assert "my_reward" in found
    assert found["my_reward"].allowed == {"file", "on_cutout"}
    assert set(REWARD_KINDS) < set(found)


def literal_lists(path: Path, kinds: set[str], least: int = 3) -> list[int]:
    """Lines of literal lists, tuples, sets or dicts that name `least` or more of `kinds`."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        named = {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)} & kinds
        if len(named) >= least:
            lines.append(node.lineno)
    return lines


def test_no_module_lists_the_kinds_by_hand():
    decls = ROOT / "richpref" / "schemas" / "rewards"
    found = {str(p.relative_to(ROOT)): lines for p in sorted((ROOT / "richpref").rglob("*.py"))
             if decls not in p.parents and (lines := literal_lists(p, set(REWARD_KINDS)))}
    assert not found, f"reward kinds listed outside richpref/schemas/rewards/: {found}"
