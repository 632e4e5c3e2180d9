"""`richpref summary | status | report | card | inspect` on a run that does not exist: one `error:` line with the
fix and exit 2 (bad input), not a traceback. On a run that exists (a copy of the mini run): a SQL statement
duckdb refuses is one `error:` line and exit 2; a card whose upload the Hub refuses is written, then one
`error:` line and exit 1; a report's --out folder is created (an --out that is a folder: tests/cli/test_errors.py);
the inspect shell runs statements over several lines, reports a refused one and goes on."""
from __future__ import annotations

import shutil

import pytest

from richpref.cli.commands import main


@pytest.mark.parametrize("command", [["summary"], ["status"], ["report"], ["card"], ["inspect", "-c", "select 1"]])
def test_a_view_of_a_run_with_no_shards_names_it_and_the_fix(command, tmp_path, capsys):
    rc = main(["--data-dir", str(tmp_path), command[0], "no-such-run", *command[1:]])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == (f"error: run 'no-such-run' has no shards under {tmp_path}/runs/no-such-run; "
                           "run `richpref curate --run no-such-run` first")


def test_a_card_of_a_run_without_pairs_yet_is_refused_and_writes_nothing(mini_run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(mini_run[0], data)
    shutil.rmtree(data / "runs" / "mini" / "pairs")  # stopped before the export stage (`--until relabel`)
    assert main(["--data-dir", str(data), "card", "mini"]) == 2
    assert capsys.readouterr().err.startswith(f"error: run 'mini' has no committed pairs shards under {data}/runs/mini/pairs")
    assert not (data / "runs" / "mini" / "pairs").exists()  # before: a card and plots of no pairs, in a new pairs/


def test_a_bad_statement_and_a_refused_upload_are_one_line_each(mini_run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(mini_run[0], data)  # the card writes into the run: a copy keeps the shared one as it is
    assert main(["--data-dir", str(data), "inspect", "mini", "-c", "select 1 as one"]) == 0
    assert "one" in capsys.readouterr().out
    assert main(["--data-dir", str(data), "inspect", "mini", "-c", "select no_such_column from pairs"]) == 2
    err = capsys.readouterr().err  # before: a duckdb BinderException traceback
    assert err.startswith('error: Binder Error: Referenced column "no_such_column" not found') and "Traceback" not in err
    # HF_HUB_OFFLINE=1 (tests/conftest.py): the Hub refuses; before: an OfflineModeIsEnabled traceback
    assert main(["--data-dir", str(data), "card", "mini", "--push-to-hub", "someone/pairs"]) == 1
    out, err = capsys.readouterr()
    assert "README.md" in out and (data / "runs" / "mini" / "pairs" / "README.md").is_file()
    assert err.startswith(f"error: {data}/runs/mini/pairs was not uploaded to the Hub dataset 'someone/pairs' "
                          "(OfflineModeIsEnabled: ") and "`hf auth login`" in err and "Traceback" not in err
    page = tmp_path / "new" / "folder" / "report.html"  # before: FileNotFoundError for the missing folder
    assert main(["--data-dir", str(data), "report", "mini", "--out", str(page)]) == 0 and page.is_file()
    html = page.read_text()  # each pair's scores, composite last; the candidate indexes are no score
    assert "<td><b>composite</b></td>" in html and "<td>pickscore</td>" in html and "<td>candidate</td>" not in html
    assert ">filter: drop filter: not_executed(p_yes=0.10 &lt; 0.5)</p>" in html  # the filter's reason, first


def _typed(*lines):
    """`input` that returns `lines`, then raises EOFError (Ctrl-D); `read.left` the lines not read."""
    def read(prompt=""):
        if not read.left:
            raise EOFError
        return read.left.pop(0)
    read.left = list(lines)
    return read


def test_the_shell_runs_statements_across_lines_reports_an_error_and_goes_on(mini_run, monkeypatch, capsys):
    typed = _typed("select count(*) as n", "from pairs;", "select * from no_such_view;", "select 41 + 1 as answer;",
                   ".quit", "select 'never read';")
    monkeypatch.setattr("builtins.input", typed)
    assert main(["--data-dir", str(mini_run[0]), "inspect", "mini"]) == 0
    out = capsys.readouterr().out
    assert "views: source," in out and "error: Catalog Error" in out and "42" in out
    assert typed.left == ["select 'never read';"]
    monkeypatch.setattr("builtins.input", _typed("select 'read' as x;"))  # Ctrl-D ends it too
    assert main(["--data-dir", str(mini_run[0]), "inspect", "mini"]) == 0 and "read" in capsys.readouterr().out


def test_planning_and_inspecting_a_run_import_no_torch(mini_run, tiny_models, tmp_path):
    """torch (1.5 s of a 2.9 s `richpref status`) is for loading models: none of these loads one."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runs = [["--data-dir", str(mini_run[0]), *cmd] for cmd in (["status", "mini"], ["summary", "mini"],
                                                               ["inspect", "mini", "-c", "select count(*) from pairs"])]
    runs.append(["--data-dir", str(tmp_path), "curate", "--profile", "tiny", "--models-root", str(tiny_models), "--plan"])
    code = ("import json, sys; from richpref.cli.commands import main; "
            "print(json.dumps([main(a), 'torch' in sys.modules]))")
    for argv in runs:
        done = subprocess.run([sys.executable, "-c", code.replace("main(a)", f"main({argv!r})")], cwd=repo,
                              env={**os.environ, "PYTHONPATH": repo, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                              text=True, timeout=120)
        assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, False], (argv, done.stdout, done.stderr[-2000:])
