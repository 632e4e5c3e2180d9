"""`richpref curate` command-line checks that fail before Prefect or any model starts."""
from __future__ import annotations

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
