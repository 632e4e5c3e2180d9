"""tools/mutants.py: which operators a mutant flips, one at a time, and the source of each."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from mutants import mutant, sites  # noqa: E402


def test_each_mutant_flips_one_operator_and_leaves_the_tree_as_it_was():
    tree = ast.parse("def f(a, b, c):\n    return a < b and c + 1 in (a, b) or a * b\n")
    found = sites(tree)
    flipped = [mutant(tree, s).splitlines()[1].strip() for s in found]
    assert flipped == ["return (a < b and c + 1 in (a, b)) and a * b",
                       "return (a < b or c + 1 in (a, b)) or a * b",
                       "return a <= b and c + 1 in (a, b) or a * b",
                       "return a < b and c + 1 not in (a, b) or a * b",
                       "return a < b and c - 1 in (a, b) or a * b",
                       "return a < b and c + 1 in (a, b) or a / b"]
    assert ast.unparse(tree).splitlines()[1].strip() == "return a < b and c + 1 in (a, b) or a * b"
