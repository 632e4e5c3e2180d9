"""Do the tests of a module fail when its code is wrong? Flip one operator of the module at a time
(a comparison, `+ - * /`, `and`/`or`, `in`, `is`), run the given tests on each such mutant, and list
the mutants no test failed on. A listed one is a test to write, or a mutant that changes nothing
(a bound that no value reaches, a cache's size): say which before leaving it.

    .venv/bin/python tools/mutants.py richpref/tasks/filter.py tests/tasks/test_filter.py [-k EXPR] [--only 4,9]

The working tree is never touched: each mutant is written into a copy of the tracked files, which the
tests import (PYTHONPATH); the tiny models come from RICHPREF_TEST_MODELS as in `make test`.
"""
from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.Add: ast.Sub, ast.Sub: ast.Add,
         ast.Mult: ast.Div, ast.Div: ast.Mult, ast.And: ast.Or, ast.Or: ast.And}


def sites(tree: ast.AST) -> list[tuple[ast.AST, int | None]]:
    """Every operator a mutant flips: (node, index among a comparison's operators, else None)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            found += [(node, k) for k, op in enumerate(node.ops) if type(op) in SWAPS]
        elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
            found.append((node, None))
    return sorted(found, key=lambda s: (s[0].lineno, s[0].col_offset, s[1] or 0))


def mutant(tree: ast.AST, site: tuple[ast.AST, int | None]) -> str:
    """The module's source with the operator at `site` flipped (the tree is left as it was)."""
    node, k = site
    if k is None:
        old, node.op = node.op, SWAPS[type(node.op)]()
    else:
        old, node.ops[k] = node.ops[k], SWAPS[type(node.ops[k])]()
    try:
        return ast.unparse(tree)
    finally:
        if k is None:
            node.op = old
        else:
            node.ops[k] = old


def tracked_copy(into: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, into / name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", help="a source file, relative to the repository")
    ap.add_argument("tests", nargs="+", help="test files (relative to the repository)")
    ap.add_argument("-k", default=None, help="pytest's -k expression")
    ap.add_argument("--only", default="", help="mutant numbers to run, e.g. 4,9 (default: all)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds a mutant's tests may run; past them it counts as killed (a flip can loop forever)")
    args = ap.parse_args()
    source = (REPO / args.module).read_text()
    tree = ast.parse(source)
    found = sites(tree)
    only = {int(n) for n in args.only.split(",") if n}
    print(f"{args.module}: {len(found)} mutants", flush=True)
    lived = []
    with tempfile.TemporaryDirectory(prefix="richpref-mutants-") as tmp:
        copy = Path(tmp)
        tracked_copy(copy)
        env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args.tests]
        cmd += ["-k", args.k] if args.k else []
        for n, site in enumerate(found):
            if only and n not in only:
                continue
            (copy / args.module).write_text(mutant(tree, site))
            t0 = time.time()
            try:
                failed = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, timeout=args.timeout).returncode != 0
                verdict = "killed" if failed else "LIVED"
            except subprocess.TimeoutExpired:
                failed, verdict = True, "killed (timed out)"
            line = source.splitlines()[site[0].lineno - 1].strip()
            print(f"  #{n} line {site[0].lineno}: {verdict} ({time.time() - t0:.0f} s)  {line[:100]}", flush=True)
            if not failed:
                lived.append(n)
        (copy / args.module).write_text(source)
    print(f"lived: {', '.join(map(str, lived)) or 'none'} of {len(only or found)}")
    return 1 if lived else 0


if __name__ == "__main__":
    sys.exit(main())
