"""One declaration per VLM engine (richpref/schemas/vlm_engines/): the config's allowed `engine.backend`
and `engine.launch` values, the launch commands and the one loading switch (richpref/models/vlm_engine.py)
come from it, and no other module lists the engines or switches on them."""
from __future__ import annotations

import ast
import importlib
import inspect
import sys
import typing

import pytest
from pydantic import ValidationError

from richpref.schemas import vlm_engines as engine_decls
from richpref.schemas.serving import EngineConfig
from richpref.schemas.vlm_engines import BACKENDS, CHAT_LAUNCHERS, LAUNCHERS, VLM_ENGINES, engine_of
from test_plugins import ROOT, literal_lists


def test_the_config_allows_exactly_the_declared_engines():
    assert typing.get_args(EngineConfig.model_fields["backend"].annotation) == BACKENDS
    launch = typing.get_args(EngineConfig.model_fields["launch"].annotation)[0]
    assert typing.get_args(launch) == LAUNCHERS == ("vllm", "sglang", "transformers", "richpref")
    assert CHAT_LAUNCHERS == tuple(k for k in LAUNCHERS if not VLM_ENGINES[k].head)
    with pytest.raises(ValidationError) as err:
        EngineConfig(backend="server", launch="vlm")
    assert all(f"'{k}'" in str(err.value) for k in LAUNCHERS)
    with pytest.raises(ValidationError) as err:
        EngineConfig(backend="server")
    assert " | ".join(LAUNCHERS) in str(err.value)


def test_every_engine_config_selects_one_declaration():
    assert engine_of(None).kind == engine_of(EngineConfig()).kind == "in_process"
    assert engine_of(EngineConfig(backend="server", endpoint="http://h:1/v1")).kind == "endpoint"
    for kind in LAUNCHERS:
        assert engine_of(EngineConfig(backend="server", launch=kind)) is VLM_ENGINES[kind]


@pytest.mark.parametrize("kind", list(VLM_ENGINES))
def test_a_declaration_fits_the_switch_and_the_launcher(kind):
    from richpref.models.vlm_engine import load_vlm
    from richpref.models.vlm_server import launch_command

    decl = VLM_ENGINES[kind]
    if decl.loader:  # called with the switch's arguments
        module, attr = decl.loader.split(":")
        params = inspect.signature(getattr(importlib.import_module(f"richpref.models.{module}"), attr)).parameters
        switch = inspect.signature(load_vlm).parameters
        assert list(params)[:3] == ["engine", "model_ref", "models_root"]
        assert set(switch) <= set(params), f"{decl.loader} lacks {set(switch) - set(params)}"
    else:
        assert decl.head  # the head judges' server: their reward loader is its client
    assert decl.launched == (decl.command is not None) == bool(decl.install)
    if decl.launched:
        cmd = launch_command(kind, "/m", "name", 8123, extra_args=["--mine"])
        assert "/m" in cmd and "8123" in cmd and cmd[-1] == "--mine"


def test_the_switch_loads_in_process_and_refuses_the_head_judges_server(paths):
    from richpref.models.vlm import VisionLanguageModel
    from richpref.models.vlm_engine import load_vlm

    with load_vlm(None, str(paths.vlm), device="cpu") as vlm:
        assert isinstance(vlm, VisionLanguageModel)
    with pytest.raises(ValueError, match="head judges"):
        load_vlm(EngineConfig(backend="server", launch="richpref"), str(paths.vlm))
    with pytest.raises(ValueError, match="unknown launcher 'tgi'; use one of vllm, sglang"):
        from richpref.models.vlm_server import launch_command

        launch_command("tgi", "/m", "m", 1)


def test_a_new_declaration_module_is_found(tmp_path, monkeypatch):
    """Adding a VLM backend is adding a module here: discovery walks the package."""
    pkg = tmp_path / "extra"
    pkg.mkdir()
    (pkg / "my_server.py").write_text(
        "from richpref.schemas.vlm_engines import VLMEngine\n"
        "KINDS = (VLMEngine('my_server', backend='server', loader='vlm_client:connect', rank=9, launched=True,\n"
        "                   command=lambda *a, **k: ['my-server'], install='pip install my-server'),)\n")
    monkeypatch.setattr(engine_decls, "__path__", [*engine_decls.__path__, str(pkg)])
    try:
        found = engine_decls._discover()
    finally:
        sys.modules.pop("richpref.schemas.vlm_engines.my_server", None)
    assert list(found)[-1] == "my_server" and set(VLM_ENGINES) < set(found)


def _switches(path, kinds: set[str]) -> list[int]:
    """Lines comparing something with an engine's name (`launch == "vllm"`, `in ("sglang", ...)`) or
    calling an engine's loader directly (`VisionLanguageModel.load`, `connect(engine, ...)`)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            names = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            if names & kinds:
                lines.append(node.lineno)
        elif isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", "") == "VisionLanguageModel") \
                    or (isinstance(f, ast.Name) and f.id == "connect" and node.args
                        and getattr(node.args[0], "id", getattr(node.args[0], "attr", "")) == "engine"):
                lines.append(node.lineno)
    return lines


def test_no_module_lists_or_switches_on_the_engines_by_hand():
    decls = ROOT / "richpref" / "schemas" / "vlm_engines"
    kinds = set(VLM_ENGINES)
    sources = [p for p in sorted((ROOT / "richpref").rglob("*.py")) if decls not in p.parents]
    # `richpref` and `transformers` also name packages (cluster.py's version report lists both).
    distinct = kinds - {"richpref", "transformers"}
    listed = {str(p.relative_to(ROOT)): lines for p in sources
              if (lines := literal_lists(p, kinds) + literal_lists(p, distinct, least=2))}
    assert not listed, f"VLM engines listed outside richpref/schemas/vlm_engines/: {listed}"
    switch = ROOT / "richpref" / "models" / "vlm_engine.py"
    named = kinds - set(BACKENDS)  # `backend == "transformers"` names the in-process backend, no launcher
    switches = {str(p.relative_to(ROOT)): lines for p in sources if p != switch and (lines := _switches(p, named))}
    assert not switches, f"a VLM engine switch outside richpref/models/vlm_engine.py: {switches}"
