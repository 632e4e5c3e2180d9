"""A stage's code cannot change while its version stays: the version is in every shard's content key,
so an unbumped change would let a resumed run keep shards the new code computes differently.

tests/scenarios/stage_versions.json records, per stage, its version and a hash of its code: the stage's module
and the helper modules of richpref/tasks/ it imports (not the shared runner, not other stages),
parsed, without docstrings and with the version itself blanked out, so comments, formatting and
docstrings do not count. After changing a stage, bump its `STAGE = Stage(version=...)` and rewrite
the file with `python tests/scenarios/test_stage_versions.py`. A change that cannot alter any output (a
refactor; a new option whose default computes what the old code did and whose value is in the key)
keeps its version: rewrite the file alone, and the diff of the file records that decision.
"""
from __future__ import annotations

import ast
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).with_name("stage_versions.json")
TASKS = REPO / "richpref" / "tasks"
SHARED = {"__init__", "base", "wrappers"}  # the runner every stage goes through, not a stage's own code


def _normalised(path: Path) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Stage":
            for kw in node.keywords:
                if kw.arg == "version":
                    kw.value = ast.Constant("")
    return ast.dump(tree, annotate_fields=False)


def _helpers(path: Path, stage_modules: set[str]) -> list[Path]:
    """The modules of richpref/tasks/ that `path` imports, other than the shared runner and stages."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("richpref.tasks."):
            names.add(node.module.split(".")[2])
    return sorted(TASKS / f"{n.split('.')[0]}.py" for n in names
                  if n.split(".")[0] not in SHARED | stage_modules and (TASKS / f"{n.split('.')[0]}.py").exists())


def current() -> dict[str, dict[str, str]]:
    """{stage name: {"version", "code"}} as the code stands."""
    from richpref.tasks import ALL_STAGES, REBUILD, RELABEL_DATASET

    # The sources too: their keys hold their versions beside their rows' bytes.
    stages = {s.name: s for s in (*ALL_STAGES, *REBUILD[1:], *RELABEL_DATASET)}
    modules = {s.name: Path(sys.modules[s.compute.__module__].__file__) for s in stages.values()}
    stage_modules = {p.stem for p in modules.values()}
    out = {}
    for name, stage in stages.items():
        files = [modules[name], *_helpers(modules[name], stage_modules)]
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + _normalised(f).encode() + b"\0")
        out[name] = {"version": stage.version, "code": digest.hexdigest()[:16],
                     "files": [str(f.relative_to(REPO)) for f in files]}
    return out


def test_every_stage_bumped_its_version_when_its_code_changed():
    recorded = json.loads(RECORD.read_text())
    problems = []
    for name, now in current().items():
        was = recorded.get(name)
        if was is None:
            problems.append(f"stage {name} is not in {RECORD.name}: run `python tests/scenarios/test_stage_versions.py`")
        elif was["code"] != now["code"] and was["version"] == now["version"]:
            problems.append(f"stage {name}'s code changed ({', '.join(now['files'])}): bump STAGE version "
                            f"(now {now['version']!r}) and update the file with `python tests/scenarios/test_stage_versions.py`")
        elif was != now:
            problems.append(f"stage {name}: version {was['version']!r} -> {now['version']!r}; update "
                            f"{RECORD.name} with `python tests/scenarios/test_stage_versions.py`")
    assert not problems, "\n".join(problems)


def test_the_hash_ignores_docstrings_comments_and_the_version_but_not_code(tmp_path):
    a = tmp_path / "a.py"
    a.write_text('"""doc"""\nSTAGE = Stage(name="x", version="1")\ndef f():\n    return 1\n')
    base = _normalised(a)
    a.write_text('"""other doc"""\n# a comment\nSTAGE = Stage(name="x", version="2")\n\ndef f():\n    """d"""\n    return 1\n')
    assert _normalised(a) == base
    a.write_text('"""doc"""\nSTAGE = Stage(name="x", version="1")\ndef f():\n    return 2\n')
    assert _normalised(a) != base


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    RECORD.write_text(json.dumps(current(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {RECORD}")
