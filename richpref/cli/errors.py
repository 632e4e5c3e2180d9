"""How every `richpref` command reports an input it refuses: one line on stderr, an exit code."""
from __future__ import annotations

import argparse
import os
import sys


def fail(exc: BaseException | str, code: int | None = None) -> int:
    """Print `error: <message>` (the message names the input and the fix) and return the exit code:
    `code`, else the one the exception carries (`exit_code`), else 2.

    2: bad input refused before any work (config, data, arguments); 3: a model that cannot be found or
    loaded (ModelNotAvailable, the doctor's ModelProblem); 1: the work started and failed.
    """
    print(f"error: {exc}", file=sys.stderr)
    return code if code is not None else getattr(exc, "exit_code", 2)


def run_name(value: str) -> str:
    """argparse type of a RUN argument: a name refused here is a usage error (exit 2), not a traceback."""
    from richpref.schemas.common import check_run_name

    try:
        return check_run_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def data_folder(value: str) -> str:
    """argparse type of a data dir a command writes a run into, created when missing (a local path or an
    fsspec URL): a local path that is a file is a usage error, not a FileExistsError at the first write."""
    if "://" not in value and os.path.exists(value) and not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value} is a file, not a folder; give a folder (created when missing)")
    return value


def folder(value: str) -> str:
    """argparse type of a local folder a command writes into (trainer checkpoints, an export, models): a
    URL would become a local folder named after it (`s3:/bucket/...`), so it is a usage error too."""
    if "://" in value:
        raise argparse.ArgumentTypeError(f"{value}: this command writes a local folder; give a local or shared-filesystem "
                                         "path (copy the folder to the store afterwards)")
    return data_folder(value)


def output_file(value: str) -> str:
    """argparse type of a local file a command writes after its work, its folder created when missing: a
    path that is a folder, or lies under a file, is a usage error before the work, not an error after it."""
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value} is a folder; give a file path (its folder is created when missing)")
    above = os.path.dirname(os.path.abspath(value))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise argparse.ArgumentTypeError(f"{value}: {above} is a file, not a folder")
    return value
