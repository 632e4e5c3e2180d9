"""The code's shape: no import circle in the library, no library module importing a flow, no file over
400 lines, and tests named after the module they test. Read from the source with `ast` (every import
statement counts, lazy ones included: a circle through a function-level import is still a circle).
Also: a test session leaves no temporary files behind when it passes (tests/conftest.py)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 400


def module_files(package: str) -> dict[str, Path]:
    root = REPO / package
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` (and any `flows` module) that the file at `path` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t == "flows" or t.startswith("flows."):
                found.add(t)
            while t and t not in known:  # `import richpref.a.b` of a name inside a module
                t = t.rpartition(".")[0]
            if t:
                found.add(t)
    found.discard(name)
    return found


def import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    files = {k: v for p in packages for k, v in module_files(p).items()}
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep in graph and dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_relative_lazy_and_package_imports():
    graph = import_graph(("richpref", "flows"))
    assert "richpref.tasks.relabel" in graph["richpref.tasks"]  # from . import relabel
    assert "richpref.run.storage" in graph["richpref.views.inspect"]  # from .storage import RunStore
    assert "richpref.tasks" in graph["richpref.views.inspect"]  # from .tasks import OUTPUTS
    assert "richpref.views.datacard" in graph["richpref.recipes.relabel_dataset"]  # a function-level import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_library_or_the_flows():
    cycle = find_cycle(import_graph(("richpref", "flows")))
    assert cycle is None, f"import circle: {' -> '.join(cycle)}; move the shared code down a layer"


def test_no_library_module_imports_a_flow():
    graph = import_graph(("richpref", "flows"))
    upward = {m: sorted(d for d in deps if d == "flows" or d.startswith("flows."))
              for m, deps in graph.items() if m.startswith("richpref")}
    upward = {m: d for m, d in upward.items() if d}
    assert not upward, (f"library modules import flows: {upward}; start a flow by its entrypoint "
                        "(richpref.ops.entrypoints.load_flow) or move the shared code into the library")


def test_no_file_over_400_lines():
    long = {str(p.relative_to(REPO)): n for pkg in ("richpref", "flows", "bench", "tools", "tests") for p in (REPO / pkg).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them into clearer modules): {long}"


# The packages of the library, lowest layer first. A module may import its own package and any package of a
# lower layer, never a higher one: the tree shows the architecture (docs/architecture.md draws it).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("common", "prompts", "data"),  # generic helpers, prompt templates, bundled data
    ("schemas",),                   # configs and table schemas
    ("models", "sources"),          # model backends; source readers
    ("tasks",),                     # the stages: pure functions over shards
    ("run",),                       # the shard runner and its orchestration
    ("training",),                  # finetune and evaluate
    ("views", "exports"),           # read a finished run: inspect, report, card; exports for other trainers
    ("doctor", "recipes"),          # measure a run's cost; recipes of several flows (rounds, relabel-dataset)
    ("ops",),                       # processes richpref owns: Prefect server, pools, entrypoints
    ("cli",),                       # the command line
)
MAX_ROOT_MODULES = 1  # richpref/__init__.py only


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "richpref":
        return None
    return next((i for i, pkgs in enumerate(LAYERS) if parts[1] in pkgs), None)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in graph.items():
        here = layer_of(mod)
        for dep in deps:
            there = layer_of(dep)
            if here is not None and there is not None and there > here:
                out.append(f"{mod} -> {dep}")
    return sorted(out)


def test_every_package_has_a_layer_and_the_root_holds_no_loose_modules():
    packages = {p.name for p in (REPO / "richpref").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    known = {p for pkgs in LAYERS for p in pkgs}
    assert packages <= known, f"packages without a layer in LAYERS: {sorted(packages - known)}"
    loose = sorted(p.name for p in (REPO / "richpref").glob("*.py"))
    assert len(loose) <= MAX_ROOT_MODULES, f"loose modules at richpref/'s root (move them into a package): {loose}"


def test_no_module_imports_a_higher_layer():
    assert upward_imports({"richpref.tasks.a": {"richpref.run.runner"}}) == ["richpref.tasks.a -> richpref.run.runner"]
    assert upward_imports({"richpref.run.a": {"richpref.tasks.b", "richpref.run.c"}}) == []
    up = upward_imports(import_graph(("richpref",)))
    assert not up, f"imports from a lower layer into a higher one (move the shared code down): {up}"


def test_tests_mirror_the_source():
    """tests/<pkg>/.../test_<m>.py tests richpref/<pkg>/.../<m>.py (or its subpackage <m>/), tests/bench/ bench/<m>.py
    and tests/tools/ tools/<m>.py: one test file per module, found by its name. Tests across modules (a whole run, crashes,
    several nodes, the CLI's bad inputs, profiles, the layout) live in tests/scenarios/, each saying in
    its docstring what it covers. A file name is used once in tests/: pytest imports test files by it."""
    tests = REPO / "tests"
    wrong, undocumented, names = [], [], {}
    for path in sorted(tests.rglob("test_*.py")):
        rel = path.relative_to(tests)
        names.setdefault(path.name, []).append(str(rel))
        if rel.parts[0] == "scenarios" and len(rel.parts) == 2:
            if not (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip():
                undocumented.append(str(rel))
            continue
        if len(rel.parts) == 1:
            wrong.append(f"{rel} (a test of several modules belongs in tests/scenarios/)")
            continue
        top = ("richpref",) if rel.parts[0] not in ("bench", "tools") else ()
        base = REPO.joinpath(*top, *rel.parts[:-1])
        module = path.stem.removeprefix("test_")
        if not ((base / f"{module}.py").is_file() or (base / module / "__init__.py").is_file()):
            wrong.append(f"{rel} (no module {base.relative_to(REPO) / module})")
    assert not wrong, f"test files named after no module: {wrong}"
    assert not undocumented, f"scenario tests without a docstring saying what they cover: {undocumented}"
    twice = {n: p for n, p in names.items() if len(p) > 1}
    assert not twice, f"test file names used twice: {twice}"


def test_the_files_sharing_a_costly_session_fixture_form_one_xdist_group(request):
    # tests/conftest.py by its path: pytest registers each conftest under it (tests/tasks/ has one too).
    xdist_groups = request.config.pluginmanager.get_plugin(str(REPO / "tests" / "conftest.py")).xdist_groups

    groups = xdist_groups({"tests/a.py": {"tmp_path", "finished_run"}, "tests/b.py": {"finished_run"},
                           "tests/c.py": {"small_reference", "prefect_server"}, "tests/d.py": {"prefect_server"},
                           "tests/e.py": {"tmp_path"}})
    assert groups == {"tests/a.py": "finished-run", "tests/b.py": "finished-run", "tests/c.py": "served",
                      "tests/d.py": "served", "tests/e.py": "tests/e.py"}


PROBE = '''
import multiprocessing.util, subprocess, sys, tempfile

def test_probe(tmp_path):
    (tmp_path / "made-by-the-test").write_text("x")
    multiprocessing.util.get_temp_dir()
    subprocess.run([sys.executable, "-c", "import tempfile; tempfile.mkdtemp(prefix='made-by-a-subprocess-')"], check=True)
    assert {PASS}
'''


def _session_in(tmp_path, passes: bool) -> list[str]:
    """Run tests/conftest.py's session around one probe test with TMPDIR in `tmp_path`; what is left there."""
    import os
    import shutil
    import subprocess
    import sys

    suite, root = tmp_path / "suite", tmp_path / "tmp"
    suite.mkdir(parents=True)
    root.mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", suite / "conftest.py")
    (suite / "test_probe.py").write_text(PROBE.replace("{PASS}", str(passes)))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
                         cwd=suite, env={**os.environ, "TMPDIR": str(root)}, capture_output=True, text=True)
    assert (run.returncode == 0) == passes, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr  # e.g. an exit handler finding its folder gone
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_passing_session_leaves_no_temporary_files_and_a_failing_one_keeps_them(tmp_path):
    assert _session_in(tmp_path / "passing", passes=True) == []
    left = _session_in(tmp_path / "failing", passes=False)
    assert any("made-by-a-subprocess-" in p for p in left) and any(p.endswith("made-by-the-test") for p in left), left
