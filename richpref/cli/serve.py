"""`richpref serve`: a local Prefect server, work pools, deployments and a process worker."""
from __future__ import annotations

import argparse
import subprocess

from richpref.cli.errors import fail
from richpref.common.argtypes import port


def cmd_serve(args: argparse.Namespace) -> int:
    from richpref.common.procs import PortInUse
    from richpref.ops.serve import serve_forever

    try:
        return serve_forever(data_dir=args.data_dir, host=args.host, port=args.port, worker_pool=args.pool or None,
                             verbose=args.verbose)
    except PortInUse as exc:
        return fail(exc)
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:  # a server or step that did not come up
        return fail(f"{exc}{'' if args.verbose else ' (run again with --verbose to see its output)'}", 1)


def cmd_serve_judge(args: argparse.Namespace) -> int:
    from richpref.common.procs import PortInUse
    from richpref.models.judge_server import JudgeArgumentError, serve
    from richpref.models.rewards.base import RewardLoadError
    from richpref.models.runtime import ModelNotAvailable

    try:
        return serve(args)
    except (PortInUse, JudgeArgumentError) as exc:
        return fail(exc)
    except (ModelNotAvailable, RewardLoadError) as exc:  # a checkpoint not there, or not the reference's layout
        return fail(exc, 3)


def register(sub) -> None:
    sv = sub.add_parser("serve", help="local Prefect server + work pools + deployments + a process worker")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=port, default=4200)
    sv.add_argument("--pool", default="cpu", help="work pool the worker serves ('' for no worker)")
    sv.add_argument("--verbose", action="store_true", help="show server and worker output")
    sv.set_defaults(fn=cmd_serve)
    from richpref.models.judge_server import parser as judge_parser  # serve judge --kind …

    judge_parser(sv.add_subparsers(dest="serving", metavar="judge").add_parser(
        "judge", help="richpref's judge server: a head judge (hpsv3, edit_reward) over HTTP")).set_defaults(fn=cmd_serve_judge)
