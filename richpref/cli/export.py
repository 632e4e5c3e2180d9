"""`richpref export RUN --format F --out DIR`: a run's pairs in another trainer's layout."""
from __future__ import annotations

import argparse

from richpref.cli.errors import fail, folder, run_name
from richpref.exports.formats import FORMATS


def cmd_export(args: argparse.Namespace) -> int:
    from richpref.exports.writer import ExportError, export_run, format_result

    try:
        m = export_run(args.data_dir, args.run, args.format, args.out)
    except (ExportError, ValueError, OSError) as exc:  # OSError: an --out that cannot be written
        return fail(exc)
    print(format_result(m, args.out))
    return 0


def register(sub) -> None:
    e = sub.add_parser("export", help="write RUN's committed pairs in another trainer's layout "
                                      "(Pick-a-Pic Parquet, kohya w/l folders, SimpleTuner Flow-DPO, Flow-Factory jsonl)")
    e.add_argument("run", type=run_name)
    e.add_argument("--format", required=True, choices=FORMATS,
                   help="pickapic: Parquet; kohya-wl: sd-scripts preference w/ and l/ folders; simpletuner: "
                        "Flow-DPO win/lose datasets; jsonl: Flow-Factory offline-DPO train.jsonl")
    e.add_argument("--out", required=True, type=folder, help="folder to write (created; a rerun updates it in place)")
    e.set_defaults(fn=cmd_export)
