"""`richpref summary | status | report | card | inspect`: read a run (committed shards only)."""
from __future__ import annotations

import argparse
import functools
import json

from richpref.cli.errors import fail, output_file, run_name


def _refuses_missing_run(cmd):
    """A run with no shards is a bad argument: `error: <message with the fix>` and exit 2, no traceback."""
    @functools.wraps(cmd)
    def wrapped(args: argparse.Namespace) -> int:
        from richpref.views.inspect import RunNotFound

        try:
            return cmd(args)
        except RunNotFound as exc:
            return fail(exc)
    return wrapped


@_refuses_missing_run
def cmd_summary(args: argparse.Namespace) -> int:
    from richpref.views.inspect import format_summary, summary

    s = summary(args.data_dir, args.run)
    print(json.dumps(s, indent=2, default=str) if args.json else format_summary(s))
    return 0


@_refuses_missing_run
def cmd_status(args: argparse.Namespace) -> int:
    from richpref.views.inspect import format_status, status

    st = status(args.data_dir, args.run)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


@_refuses_missing_run
def cmd_report(args: argparse.Namespace) -> int:
    from richpref.views.report import write_report

    try:
        print(write_report(args.data_dir, args.run, args.out))
    except OSError as exc:  # --out a folder, or a place that cannot be written (a run not found says so too)
        return fail(exc)
    return 0


@_refuses_missing_run
def cmd_card(args: argparse.Namespace) -> int:
    from richpref.views.datacard import PushFailed, push_to_hub, write_run_report
    from richpref.run.storage import RunStore

    written = write_run_report(args.data_dir, args.run)
    print(json.dumps(written, indent=2))
    if args.push_to_hub:
        store = RunStore(args.data_dir, args.run)
        try:
            print(push_to_hub(store.uri(store.stage_dir("pairs")), args.push_to_hub, private=not args.public))
        except PushFailed as exc:  # the card is written; the upload failed: exit 1
            return fail(exc, 1)
    return 0


@_refuses_missing_run
def cmd_inspect(args: argparse.Namespace) -> int:
    from richpref.views.inspect import connect

    import duckdb

    con, views = connect(args.data_dir, args.run)
    if args.command:
        try:
            print(con.sql(args.command))
        except duckdb.Error as exc:  # a statement duckdb refuses is a bad argument: one line, exit 2
            return fail(exc)
        return 0
    print(f"views: {', '.join(views)} (joined on item_id). End a statement with ';', quit with .quit or Ctrl-D.")
    buf = ""
    while True:
        try:
            line = input("richpref> " if not buf else "   ...> ")
        except EOFError:
            print()
            return 0
        if line.strip() in (".quit", ".exit", "\\q"):
            return 0
        buf += line + "\n"
        if buf.strip().endswith(";"):
            try:
                print(con.sql(buf))
            except Exception as exc:  # noqa: BLE001 - an interactive shell reports and goes on
                print(f"error: {exc}")
            buf = ""


def register(sub) -> None:
    s = sub.add_parser("summary", help="rows per stage, rejects by reason, flip rate")
    s.add_argument("run", type=run_name)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_summary)

    st = sub.add_parser("status", help="per stage: shards done / stale (committed for another config or version) / missing / failed")
    st.add_argument("run", type=run_name)
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)

    r = sub.add_parser("report", help="write a static HTML page of RUN's pairs (thumbnails, texts, scores)")
    r.add_argument("run", type=run_name)
    r.add_argument("--out", type=output_file, help="file to write, its folder created (default <run>/report.html)")
    r.set_defaults(fn=cmd_report)

    dc = sub.add_parser("card", help="write RUN's dataset card (pairs/README.md) and its plots (pairs/plots/*.png)")
    dc.add_argument("run", type=run_name)
    dc.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="also upload the pairs, the card and its plots as a Hub dataset")
    dc.add_argument("--public", action="store_true", help="with --push-to-hub: create a public repo")
    dc.set_defaults(fn=cmd_card)

    i = sub.add_parser("inspect", help="duckdb with one view per stage of RUN")
    i.add_argument("run", type=run_name)
    i.add_argument("-c", "--command", help="run one SQL statement and exit")
    i.set_defaults(fn=cmd_inspect)
