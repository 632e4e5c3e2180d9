"""richpref's judge server: a head judge (`hpsv3`, `edit_reward`) loaded with the in-process code
(`load_reward`) and answering batched score requests over HTTP. OpenAI-compatible chat servers
(`transformers serve`, vLLM) return text, not the value of a reward head, so these judges get their own.

Start it with `richpref serve judge --kind hpsv3 --model DIR [--backbone DIR] [--port N]` (or let a
reward's `engine: {backend: server, launch: richpref}` start and stop it); stop it by its pid.

API (JSON bodies; images are PNG bytes in base64, optionally as a `data:image/png;base64,` URL, and
scored at the pixels sent: the server fits them as the in-process judge does):

- `GET /health` -> 200 `{"status": "ok"}`
- `GET /v1/judge` -> `{"kind", "model", "dtype", "device", "batch_size"}`
- `POST /v1/score` (hpsv3) `{"images": [..], "prompts": [..], "batch_size": 8}` -> `{"scores": [..]}`
- `POST /v1/score_edits` (edit_reward) `{"originals": [..], "edits": [..], "instructions": [..],
  "batch_size": 8}` -> `{"scores": [..]}`: one score per (original, instruction, edit)

`batch_size` (optional; default the server's `--batch-size`) is the model batch the request is
scored in: the client sends its own, so a served score is computed in the batches the in-process one
is. A score that is not finite comes back as null. A bad request answers 400 `{"error": "…"}`
(wrong route for the kind, unequal lengths, an undecodable image); a failure of the model 500.
Requests are scored one at a time (one lock around the model); send one request per batch.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from richpref.common.argtypes import at_least, port

log = logging.getLogger("richpref")

HEAD_JUDGES = ("hpsv3", "edit_reward")  # routes and fields: rewards/served_head.py (imported when serving: torch)


class BadRequest(ValueError):
    pass


def decode_b64_image(data: str):
    from PIL import Image

    if not isinstance(data, str):
        raise BadRequest(f"an image must be a base64 string, got {type(data).__name__}")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    try:
        im = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        im.load()
        return im
    except Exception as exc:  # noqa: BLE001 - any undecodable payload is the request's fault
        raise BadRequest(f"undecodable image ({type(exc).__name__}: {exc})") from None


class JudgeApp:
    """The loaded judge and what a request does with it."""

    def __init__(self, kind: str, judge, *, model: str, batch_size: int = 8) -> None:
        self.kind, self.judge, self.model, self.batch_size = kind, judge, model, batch_size
        self.lock = threading.Lock()

    def info(self) -> dict:
        return {"kind": self.kind, "model": self.model, "dtype": str(self.judge.dtype).removeprefix("torch."),
                "device": str(self.judge.device), "batch_size": self.batch_size}

    def score(self, route: str, body: dict) -> list:
        from .rewards.served_head import FIELDS, IMAGE_FIELDS, ROUTES

        if route != ROUTES[self.kind]:
            raise BadRequest(f"this server judges {self.kind}: POST {ROUTES[self.kind]}, not {route}")
        fields = FIELDS[self.kind]
        missing = [f for f in fields if not isinstance(body.get(f), list)]
        if missing:
            raise BadRequest(f"the request lacks the list(s) {missing}; {self.kind} takes {list(fields)}")
        lengths = {f: len(body[f]) for f in fields}
        if len(set(lengths.values())) != 1:
            raise BadRequest(f"unequal lengths {lengths}: give one of each per item")
        batch_size = body.get("batch_size", self.batch_size)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise BadRequest(f"batch_size must be a positive integer, got {batch_size!r}")
        args = [[decode_b64_image(x) for x in body[f]] if f in IMAGE_FIELDS else [str(x) for x in body[f]]
                for f in fields]
        with self.lock:
            if self.kind == "hpsv3":
                out = self.judge.score(*args, batch_size=batch_size)
            else:
                out = self.judge.score_edits(*args, batch_size=batch_size)
        return [float(v) if math.isfinite(v) else None for v in out]


def make_handler(app: JudgeApp):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/judge":
                self._send(200, app.info())
            else:
                self._send(404, {"error": f"no route {self.path}; GET /health or /v1/judge"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                self._send(200, {"scores": app.score(self.path, body)})
            except (BadRequest, json.JSONDecodeError) as exc:
                self._send(400, {"error": str(exc)})
            except Exception as exc:  # noqa: BLE001 - the model failed: the client sees why
                log.exception("judge request failed")
                self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

        def log_message(self, fmt: str, *args) -> None:
            log.debug("judge server: " + fmt, *args)

    return Handler


def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="richpref serve judge", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", required=True, choices=HEAD_JUDGES)
    p.add_argument("--model", required=True, help="the reward checkpoint: a dir holding its file, a file, or a Hub id")
    p.add_argument("--backbone", default=None, help="the base Qwen-VL it was trained from (default: the reference's)")
    p.add_argument("--file", default=None, help="checkpoint file inside --model (default: the reference's name)")
    p.add_argument("--template", default=None, help="the judge's question (hpsv3; edit_reward's instruction question)")
    p.add_argument("--quality-template", default=None, help="edit_reward's visual-quality question")
    p.add_argument("--models-root", default=None, help="directory relative model references resolve against")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    p.add_argument("--batch-size", type=at_least(1), default=8, help="model batch of a request that names none")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=port, default=8700, help="TCP port (0: any free one)")
    return p


class JudgeArgumentError(ValueError):
    """An argument the judge server cannot serve with, found before the judge loads."""


def check_arguments(args: argparse.Namespace) -> None:
    """The device, the templates and the port, before the judge loads (a minute for a 7B one)."""
    from richpref.common.procs import check_port_free
    from richpref.prompts import load_head_template

    from .runtime import device_problem

    missing = device_problem(args.device)
    if missing:
        raise JudgeArgumentError(f"--device {args.device!r}: {missing}; give auto or cpu, or run on a machine that has it")
    if args.quality_template and args.kind != "edit_reward":
        raise JudgeArgumentError("--quality-template is edit_reward's; hpsv3 takes --template only")
    for flag, name in (("--template", args.template), ("--quality-template", args.quality_template)):
        try:
            if name:
                load_head_template(name)
        except ValueError as exc:
            raise JudgeArgumentError(f"{flag}: {exc}") from exc
    if args.port:
        check_port_free(args.host, args.port)


def serve(args: argparse.Namespace) -> int:
    from .rewards import load_reward
    from .runtime import resolve_model_ref

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    check_arguments(args)
    model = resolve_model_ref(args.model, args.models_root)
    options = {"backbone": resolve_model_ref(args.backbone, args.models_root) if args.backbone else None,
               "file": args.file, "template": args.template}
    if args.kind == "edit_reward":
        options["quality_template"] = args.quality_template
    judge = load_reward(args.kind, model, device=args.device, dtype=args.dtype, **options)
    app = JudgeApp(args.kind, judge, model=model, batch_size=args.batch_size)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(app))
    print(f"richpref judge server: {args.kind} {model} on http://{args.host}:{server.server_address[1]}/v1",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return serve(parser().parse_args(argv))
    except JudgeArgumentError as exc:  # a launcher reads the line from the server's output
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
