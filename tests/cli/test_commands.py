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


def test_build_tiny_prints_richpref_progress_and_not_other_libraries_info_records(tmp_path):
    # The command set the root logger to INFO, so the ONNX exporter's optimizer printed a line per pass
    # ("No unused functions to remove", ...) into `make demo`. The build itself is swapped for one
    # that logs as those libraries and richpref do; the command's own logging setup is the real one.
    code = """
import logging, sys
import richpref.models.tiny as tiny
def build(root, seed=0, force=False):
    logging.getLogger("onnx_ir.passes.common.unused_removal").info("No unused functions to remove")
    logging.getLogger("richpref").info("tiny models built under %s", root)
    logging.getLogger("onnx_ir").warning("a warning still shows")
    return {}
tiny.build_tiny_models = build
from richpref.cli.commands import main
sys.exit(main(["models", "build-tiny", sys.argv[1]]))
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert f"tiny models built under {tmp_path}" in out.stderr
    assert "a warning still shows" in out.stderr
    assert "No unused functions" not in out.stderr + out.stdout
