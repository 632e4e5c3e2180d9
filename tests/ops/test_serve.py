"""Operating richpref as a Prefect project: a real server, a process worker, deployments, and a second
run of a finished run answered from the shard manifests (no shard task runs); a second `richpref serve`
on the port the server holds is refused in one line."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from richpref.run.storage import RunStore
from run_sizes import ONE_REWARD

OVERRIDES = json.dumps(["source.limit=4", "source.shard_size=2", *ONE_REWARD])  # one voting reward: tests/run_sizes.py
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(prefect_server):
    return prefect_server


def _run_deployment(server, run: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "prefect"), "deployment", "run", "curate/tiny", "--watch", "--watch-timeout", "400",
           "--param", f"run={run}", "--param", f"data_dir={server['data']}",
           "--param", f"models_root={server['models']}", "--param", f"overrides={OVERRIDES}"]
    return subprocess.run(cmd, env=server["env"], capture_output=True, text=True, timeout=450)


def _task_states_of_latest_run(server) -> list[tuple[str, str]]:
    """(name, state) of each task run of the served server's latest flow run (read in this process)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["env"]["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        fr = c.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
        return [(t.name, t.state.name) for t in trs]


def _pairs(data, run) -> dict[int, str]:
    store = RunStore(str(data), run)
    return {s: hashlib.sha256(Path(store.shard_path("pairs", s)).read_bytes()).hexdigest() for s in store.shards("pairs")}


def test_deployment_runs_on_a_worker_then_a_second_run_computes_nothing(server):
    first = _run_deployment(server, "served")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert _pairs(server["data"], "served"), "the deployment run should export pairs"
    work = RunStore(str(server["data"]), "served").read_log("work.jsonl")
    assert {r["stage"] for r in work} >= {"source", "sample", "critique", "edit", "relabel", "export"}
    assert {name.split("-")[0] for name, _ in _task_states_of_latest_run(server)} >= {"source", "sample", "export"}

    pairs = _pairs(server["data"], "served")
    second = _run_deployment(server, "served")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # Every shard's manifest matches its content key: the flow starts no shard task at all.
    assert _task_states_of_latest_run(server) == []
    assert len(RunStore(str(server["data"]), "served").read_log("work.jsonl")) == len(work)
    assert _pairs(server["data"], "served") == pairs


def test_every_deployment_names_a_flow_its_parameters_and_a_config_that_loads():
    """prefect.yaml, which `richpref serve` deploys: a typo in a config name would fail only when a
    worker runs the deployment."""
    import importlib.util
    import inspect

    import yaml

    from richpref.schemas.config import load_profile
    from richpref.schemas.rounds import load_rounds_config
    from richpref.schemas.training import load_evaluate_config, load_finetune_config

    root = Path(__file__).resolve().parents[2]
    loaders = {"curate": load_profile, "doctor": load_profile, "finetune": load_finetune_config,
               "evaluate": load_evaluate_config, "rounds": load_rounds_config}
    deployments = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]
    seen, params_of = set(), {}
    for d in deployments:
        path, name = d["entrypoint"].split(":")
        spec = importlib.util.spec_from_file_location(f"deployed_{name}", root / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        flow = getattr(module, name)
        assert flow.name == name, d["entrypoint"]
        params = d.get("parameters", {})
        assert set(params) <= set(inspect.signature(flow.fn).parameters), (d["name"], params)
        loaders[name](params.get("profile") or params["config"])
        seen.add(f"{name}/{d['name']}")
        params_of[f"{name}/{d['name']}"] = params
    assert len(seen) == len(deployments)  # `prefect deployment run FLOW/NAME` names one deployment
    # The flow-matching chains: curate into the run the Flow-DPO config reads; evaluate its output.
    for curate, tune, evaluate in [("flux-dev-paper", "flux-dev-flowdpo", "flux-dev"),
                                   ("sd35-medium-paper", "sd35-medium-flowdpo", "sd35-medium"),
                                   ("qwen-image-paper", "qwen-image-flowdpo", "qwen-image")]:
        run = params_of[f"curate/{curate}"]["run"]
        cfg = load_finetune_config(params_of[f"finetune/{tune}"]["config"])
        assert [s.path for s in cfg.data] == [f"data/runs/{run}/pairs"], tune
        models = load_evaluate_config(params_of[f"evaluate/{evaluate}"]["config"]).models
        assert f"finetune/{cfg.name}" in [m.path for m in models], evaluate


def test_a_second_serve_on_a_port_in_use_is_refused_naming_the_port(server, capsys):
    from richpref.cli.commands import main

    port = int(server["env"]["PREFECT_API_URL"].rsplit(":", 1)[1].split("/")[0])
    assert main(["--data-dir", str(server["data"]), "serve", "--port", str(port), "--pool", ""]) == 2
    assert capsys.readouterr().err.strip() == (  # before: "the Prefect server exited with code 1" traceback
        f"error: port {port} on 127.0.0.1 is in use (another server listens there): stop it, or give --port")


def test_the_servers_prefect_home_is_under_a_local_data_dir_or_in_the_users_cache(tmp_path, monkeypatch):
    # before, a data dir on an object store gave it a local folder named s3:/bucket/data/.prefect-server
    from richpref.ops.serve import server_env

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert server_env("s3://bucket/data", "127.0.0.1", 4200)["PREFECT_HOME"] == str(
        tmp_path / "cache" / "richpref" / "prefect-server")
    assert server_env("data", "127.0.0.1", 4200)["PREFECT_HOME"] == str(tmp_path / "data" / ".prefect-server")
    assert not (tmp_path / "s3:").exists()


def test_the_printed_command_names_the_environments_prefect_as_typed_from_here(tmp_path, monkeypatch):
    # before: a bare `prefect`, on no PATH until the virtual environment is activated
    from richpref.ops.serve import _shown

    monkeypatch.chdir(tmp_path)
    assert _shown(str(tmp_path / ".venv" / "bin" / "prefect")) == ".venv/bin/prefect"
    assert _shown("/opt/elsewhere/bin/prefect") == "/opt/elsewhere/bin/prefect"
    assert _shown("prefect") == "prefect"
