"""The `richpref` command's entry module."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_python_m_runs_the_command_without_a_runpy_warning():
    # `python -m richpref.cli.commands` (what scripts and the GPU checks run) warned that the module was
    # already imported by its package, and could run it twice.
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "richpref.cli.commands", "--help"],
                         cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "curate" in out.stdout
