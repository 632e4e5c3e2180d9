"""`richpref curate` command-line checks that fail before Prefect or any model starts."""
from __future__ import annotations

import pytest

from richpref.cli.commands import main


def test_a_doctor_json_that_is_not_a_doctor_table_is_refused_before_the_flow(tmp_path, capsys):
    bad = tmp_path / "doctor.json"
    bad.write_text('{"stages": []}')
    for path in (bad, tmp_path / "missing.json"):
        code = main(["--data-dir", str(tmp_path / "data"), "curate", "--run", "r", "--workers", "2",
                     "--doctor-json", str(path)])
        err = capsys.readouterr().err
        assert code == 2 and f"--doctor-json {path}: not a `richpref doctor --json` file" in err, err
    assert not (tmp_path / "data" / "runs").exists()  # refused before any run folder was made


def test_a_dask_only_option_without_dask_workers_is_refused_not_ignored(tmp_path, capsys):
    # before: --doctor-json and --no-affinity were ignored by an in-process run, and --workers was
    # ignored beside --dask-address
    for extra in (["--doctor-json", str(tmp_path / "d.json")], ["--no-affinity"]):
        code = main(["--data-dir", str(tmp_path / "data"), "curate", "--run", "r", *extra])
        err = capsys.readouterr().err
        assert code == 2 and f"{extra[0]} shapes the plan of Dask workers, and this run has none" in err, err
    with pytest.raises(SystemExit, match="2"):
        main(["curate", "--workers", "2", "--dask-address", "tcp://127.0.0.1:1"])
    assert "argument --dask-address: not allowed with argument --workers" in capsys.readouterr().err
    assert not (tmp_path / "data" / "runs").exists()


def test_the_prefect_server_is_spawned_before_the_heavy_imports_and_stopped_when_unused(tmp_path):
    """Its start takes seconds: spawned before torch and Prefect load, it starts while they do. A
    command that then fails (here: a bad --until) stops it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = f"""
import json, sys
import richpref.ops.prefect_api as api
from richpref.cli.commands import main
seen = {{}}
spawn = api.spawn_server
def spawn_and_look(*a, **k):
    seen.update(torch="torch" in sys.modules, prefect="prefect" in sys.modules)
    seen["server"] = server = spawn(*a, **k)
    return server
api.spawn_server = spawn_and_look
code = main(["--data-dir", {str(tmp_path / "data")!r}, "curate", "--run", "r", "--until", "no-such-stage"])
server = seen.pop("server")
print(json.dumps({{**seen, "code": code, "server_exit": server.proc.poll()}}))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["prefect"] is False, got
    assert got["code"] == 2 and "--until no-such-stage" in out.stderr
    assert got["server_exit"] is not None  # stopped and reaped when the command returned


def test_a_model_that_is_not_there_fails_before_the_flow_naming_the_stage_and_where_it_looked(tmp_path, capsys):
    code = main(["--data-dir", str(tmp_path / "data"), "curate", "--run", "r", "--models-root", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "sample: model 'sd15' cannot be loaded" in err and str(tmp_path / "nowhere" / "sd15") in err
    assert not (tmp_path / "data" / "runs" / "r" / "source").exists()  # nothing ran

