"""`richpref` command line: the top-level parser; each command family registers itself from its module.

Nothing heavy (torch, Prefect, diffusers) is imported until a command runs, so `--help` is quick.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from richpref.cli.errors import fail
from richpref.cli import curate, datasets, export, models, rounds, serve, training, views


def _quiet_defaults(data_dir: str) -> None:
    """Offline-friendly defaults, set before prefect/transformers are imported; the user's env wins."""
    from richpref.common.objstore import state_dir

    defaults = {
        "PREFECT_HOME": state_dir(data_dir, ".prefect"),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "richpref",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    if "://" not in data_dir:
        from richpref.common.objstore import DataDirError

        try:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file there or on its path, no permission: the data dir's one check
            raise DataDirError(f"data dir {data_dir} cannot be made ({exc}); give a folder you can write "
                               "(--data-dir or RICHPREF_DATA_DIR)") from exc
    else:  # fail in seconds, naming the data dir and the fix, not after models have loaded
        from richpref.common.objstore import check_reachable

        check_reachable(data_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="richpref", description="Curate rich preference pairs for text-to-image "
                                "models (critique, instruct, edit, filter, relabel, export) and fine-tune on them.")
    p.add_argument("--data-dir", default=os.environ.get("RICHPREF_DATA_DIR", "data"),
                   help="where runs live (local dir or fsspec URL); default ./data")
    sub = p.add_subparsers(dest="cmd", required=True)

    for family in (curate, models, views, datasets, serve, training, rounds, export):
        family.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from richpref.common.objstore import DataDirError

    try:
        _quiet_defaults(args.data_dir)
    except DataDirError as exc:
        return fail(exc)
    import logging

    logging.getLogger("richpref").setLevel(logging.INFO)  # one progress line per shard
    try:
        return args.fn(args)
    except KeyboardInterrupt:  # Ctrl-C: what richpref started has been stopped on the way up here
        print("interrupted: the work already committed is kept; run the same command again to go on from there",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
