"""`richpref summary | status | report | card | inspect` on a run that does not exist: one `error:` line with the
fix and exit 2 (bad input), not a traceback."""
from __future__ import annotations

import pytest

from richpref.cli.commands import main


@pytest.mark.parametrize("command", [["summary"], ["status"], ["report"], ["card"], ["inspect", "-c", "select 1"]])
def test_a_view_of_a_run_with_no_shards_names_it_and_the_fix(command, tmp_path, capsys):
    rc = main(["--data-dir", str(tmp_path), command[0], "no-such-run", *command[1:]])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == (f"error: run 'no-such-run' has no shards under {tmp_path}/runs/no-such-run; "
                           "run `richpref curate --run no-such-run` first")
