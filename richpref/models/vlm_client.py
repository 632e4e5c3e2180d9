"""A VLM behind an OpenAI-compatible server (vLLM, SGLang, `transformers serve`), with the interface
the VLM stages use in-process (`generate_detailed`, `yes_no`, `expected_score`).

Each item is one chat completion: one user turn [image as a PNG data URL, text], greedy
(temperature 0), `max_tokens`. Requests run `engine.concurrency` at a time. Connection errors,
timeouts, 429 and 5xx are retried with exponential backoff or after a `Retry-After` (tenacity); a
request that still fails, or an answer that cannot be read, becomes that item's `error` (`code:
detail`) and the stage rejects its row. A server that cannot be reached at all is not a row's fault:
a launched server that died is started again (`engine.restarts`), otherwise the shard fails with
`ServerUnavailable`. Nor is a server that still refuses for load (429, 502, 503, 504) after the
retries: the shard fails with `ServerBusy`, to be rerun, instead of committing its rows as rejected.

Yes/no and rating answers are one token. The answer tokens get a logit bias of +100 when the model's
tokenizer is at hand, so the answer is always one of them; their probabilities come from the
returned `top_logprobs` (vLLM, SGLang) — a bias shared by every option cancels when they are
renormalised — else the one-token answer counts as probability 1 (source "answer").
"""
from __future__ import annotations

import base64
import io
import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import httpx
import numpy as np
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from ..schemas.serving import EngineConfig, ImageCaps
from ..schemas.vlm_engines import VLM_ENGINES
from .vlm import YES_NO, Generation, Option, YesNo, expected_score_from_probs, option_token_ids
from .vlm_server import LaunchedServer

log = logging.getLogger("richpref")


class ServerUnavailable(RuntimeError):
    """The server cannot be reached (down, or died and may not be restarted): the shard fails."""


class ServerBusy(RuntimeError):
    """The server refused a request for load through every retry: the shard fails (a rerun redoes it);
    a row rejected for it would stay rejected in the committed shard."""


# A gateway's or a loaded server's refusals: about the server's state, not the request.
BUSY_STATUSES = frozenset({429, 502, 503, 504})


class RowFailure(Exception):
    """One request failed for good; `reason` is the row's `code: detail`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_BACKOFF = wait_exponential(multiplier=0.25, max=8.0)


def _wait(state) -> float:
    """Before a retry: the seconds the server's `Retry-After` asks for (a 429's or 503's; at most a
    minute), else exponential backoff."""
    exc = state.outcome.exception()
    after = exc.response.headers.get("Retry-After") if isinstance(exc, httpx.HTTPStatusError) else None
    try:
        return min(60.0, max(0.0, float(after)))
    except (TypeError, ValueError):  # none, or an HTTP date: backoff
        return _BACKOFF(state)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, httpx.TransportError)


def image_data_url(image, caps: ImageCaps | None = None) -> str:
    """PNG data URL of the RGB image (lossless: the server sees the pixels the in-process model sees)."""
    rgb = image.convert("RGB")
    if caps is not None:
        rgb = caps.apply(rgb)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class _DataUrls:
    """The data URL of image k, made by the first request worker that needs it: each image is encoded
    once however many questions ask about it, and the others asking wait for that one encoding."""

    def __init__(self, images: Sequence, caps: ImageCaps | None) -> None:
        self.images, self.caps = images, caps
        self._lock = threading.Lock()
        self._made: dict[int, Future] = {}

    def __getitem__(self, k: int) -> str:
        im = self.images[k]
        with self._lock:
            fut = self._made.get(id(im))
            mine = fut is None
            if mine:
                fut = self._made[id(im)] = Future()
        if mine:
            try:
                fut.set_result(image_data_url(im, self.caps))
            except BaseException as exc:  # noqa: BLE001 - every asker of this image sees the error
                fut.set_exception(exc)
        return fut.result()


def _spelling_groups(options: Sequence[Option]) -> list[tuple[str, ...]]:
    return [(opt,) if isinstance(opt, str) else tuple(opt) for opt in options]


class ServedVLM:
    """Client of one served model; `close()` also stops the server it launched."""

    def __init__(self, engine: EngineConfig, served_name: str, model_id: str, *, base_url: str | None = None,
                 server: LaunchedServer | None = None, tokenizer: Any = None, image_caps: ImageCaps | None = None):
        self.engine = engine
        self.served_name = served_name
        self.model_id = model_id
        self.server = server
        self._base_url = base_url
        self.tokenizer = tokenizer
        self.image_caps = image_caps
        self.http = httpx.Client(timeout=engine.request_timeout_s,
                                 limits=httpx.Limits(max_connections=engine.concurrency))
        self.restarts_left = engine.restarts
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._stats_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return self.server.base_url if self.server is not None else self._base_url.rstrip("/")

    # ------------------------------------------------------------------ transport

    def _post_once(self, body: dict) -> dict:
        try:
            resp = self.http.post(f"{self.base_url}/chat/completions", json=body)
        except httpx.TransportError:
            if self.server is not None and not self.server.alive():
                raise ServerUnavailable(f"the {self.server.launch} server (pid {self.server.pid}) died; "
                                        f"log ends with:\n{self.server.log_tail()}") from None
            raise
        resp.raise_for_status()
        return resp.json()

    def _post(self, body: dict) -> dict:
        """One completion, retried on transient failures; RowFailure when it fails for good."""
        attempt = retry(retry=retry_if_exception(_retryable), reraise=True,
                        stop=stop_after_attempt(self.engine.retries + 1),
                        wait=_wait)(self._post_once)
        try:
            data = attempt(body)
        except httpx.HTTPStatusError as exc:
            detail = exc.response.text[:200].replace("\n", " ")
            if exc.response.status_code in BUSY_STATUSES:
                raise ServerBusy(f"the VLM server at {self.base_url} answered HTTP {exc.response.status_code} "
                                 f"after {self.engine.retries + 1} attempt(s) ({detail}): it is overloaded or not "
                                 "ready; rerun when it answers, or raise engine.retries (finished shards are kept)"
                                 ) from None
            raise RowFailure(f"vlm_request_failed: HTTP {exc.response.status_code} after "
                             f"{self.engine.retries + 1} attempt(s): {detail}") from None
        except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
            raise ServerUnavailable(f"cannot reach the VLM server at {self.base_url} "
                                    f"({type(exc).__name__}: {exc}) after {self.engine.retries + 1} attempt(s); "
                                    "start it (or check engine.endpoint) and rerun: finished shards are kept") from None
        except httpx.TransportError as exc:  # timeouts and the like: this request, not the server
            raise RowFailure(f"vlm_request_failed: {type(exc).__name__} after {self.engine.retries + 1} "
                             f"attempt(s) (engine.request_timeout_s={self.engine.request_timeout_s:g})") from None
        except ValueError as exc:  # the body is not JSON
            raise RowFailure(f"vlm_bad_response: not JSON ({exc})") from None
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, (str, type(None))):
                raise TypeError(f"content is {type(text).__name__}")
        except (KeyError, IndexError, TypeError) as exc:
            raise RowFailure(f"vlm_bad_response: no choices[0].message.content ({type(exc).__name__}: {exc})") from None
        usage = data.get("usage") or {}
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
            self.stats["completion_tokens"] += int(usage.get("completion_tokens") or 0)
        return data

    def _run(self, n: int, body, parse) -> list:
        """parse(response) for body(k), k < n, concurrently, in order; a RowFailure becomes that item's
        result. Each request worker builds its own body (encoding its image there: the PNG encoding of
        a shard's images is spread over the workers and overlaps the requests in flight)."""
        results: list = [None] * n
        pending = list(range(n))

        def one(k: int):
            try:
                return parse(self._post(body(k)))
            except RowFailure as exc:
                return exc

        while pending:
            down: ServerUnavailable | None = None
            with ThreadPoolExecutor(max_workers=self.engine.concurrency) as pool:
                futures = {k: pool.submit(one, k) for k in pending}
                for k, fut in futures.items():
                    try:
                        results[k] = fut.result()
                    except ServerUnavailable as exc:
                        down = exc
            pending = [k for k in pending if results[k] is None]
            if down is None:
                break
            if self.server is None or self.restarts_left <= 0:
                raise down
            self.restarts_left -= 1
            log.warning("VLM server died mid-stage (%s); restarting it (%d restart(s) left) for %d request(s)",
                        str(down).splitlines()[0], self.restarts_left, len(pending))
            self.server.start()
        return results

    def _body(self, image_url: str, prompt: str, max_tokens: int) -> dict:
        return {
            "model": self.served_name,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": prompt}]}],
            "temperature": 0.0,
            "max_tokens": max_tokens,
        }

    def _urls(self, images: Sequence) -> "_DataUrls":
        return _DataUrls(images, self.image_caps)

    # ------------------------------------------------------------------ the VLM interface

    def generate_detailed(self, images: list, prompts: list[str], *, max_new_tokens: int = 128,
                          batch_size: int = 8) -> list[Generation]:
        """Greedy answers; `finished` is False when the server stopped at max_tokens."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")

        def parse(data: dict) -> Generation:
            choice = data["choices"][0]
            text = (choice["message"]["content"] or "").strip()
            used = int((data.get("usage") or {}).get("completion_tokens") or 0)
            finished = choice.get("finish_reason") != "length"
            # servers differ on counting the stop token; new_tokens is informational only
            return Generation(text=text, finished=finished, new_tokens=used - 1 if finished and used else used)

        urls = self._urls(images)
        out = self._run(len(prompts), lambda k: self._body(urls[k], prompts[k], max_new_tokens), parse)
        return [Generation(text="", finished=False, new_tokens=0, error=r.reason) if isinstance(r, RowFailure) else r
                for r in out]

    def generate(self, images: list, prompts: list[str], *, max_new_tokens: int = 128, batch_size: int = 8) -> list[str]:
        return [g.text for g in self.generate_detailed(images, prompts, max_new_tokens=max_new_tokens)]

    def option_answers(self, images: list, prompts: list[str], options: Sequence[Option]) -> list[tuple]:
        """Per item: (probabilities over `options` or None, source, error)."""
        groups = _spelling_groups(options)
        bias = {}
        if self.tokenizer is not None:
            bias = {str(i): 100.0 for g in option_token_ids(self.tokenizer, options) for i in g}

        def parse(data: dict):
            choice = data["choices"][0]
            top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
            if top:
                mass = [sum(math.exp(t["logprob"]) for t in top if t.get("token") in g) for g in groups]
                if sum(mass) > 0:
                    return np.asarray(mass) / sum(mass), "logprobs", None
            answer = (choice["message"]["content"] or "").strip()
            for k, g in enumerate(groups):
                if answer.rstrip(".!").lower() in {s.strip().lower() for s in g}:
                    return np.eye(len(groups))[k], "answer", None
            return None, "answer", (f"unparseable_answer: {answer[:40]!r} is none of "
                                    f"{[g[0].strip() for g in groups]}")

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        urls = self._urls(images)

        def body(k: int) -> dict:
            out = self._body(urls[k], prompts[k], 1)
            out.update(logprobs=True, top_logprobs=self.engine.top_logprobs)
            if bias:
                out["logit_bias"] = bias
            return out

        return [(None, "answer", r.reason) if isinstance(r, RowFailure) else r
                for r in self._run(len(prompts), body, parse)]

    def yes_no(self, images: list, prompts: list[str], *, batch_size: int = 8) -> list[YesNo]:
        return [YesNo(None if p is None else float(p[0]), source, error)
                for p, source, error in self.option_answers(images, prompts, YES_NO)]

    def p_yes(self, images: list, prompts: list[str], *, batch_size: int = 8) -> np.ndarray:
        """P(yes) per item; a failed item raises (use `yes_no` to reject rows one by one)."""
        answers = self.yes_no(images, prompts)
        failed = next((a.error for a in answers if a.error), None)
        if failed:
            raise RuntimeError(failed)
        return np.asarray([a.p for a in answers], dtype=np.float64)

    def expected_score(self, images: list, prompts: list[str], *, scale: Sequence[int] = range(1, 10),
                       batch_size: int = 8) -> np.ndarray:
        """PortraitRL expected score in [0, 1] from the digit tokens' logprobs (else the answered digit).
        A rating that cannot be had fails the batch: a reward has no row to reject."""
        values = list(scale)
        answers = self.option_answers(images, prompts, [str(m) for m in values])
        failed = next((e for _, _, e in answers if e), None)
        if failed:
            raise RuntimeError(f"vlm_score: {failed}")
        if not answers:
            return np.zeros(0, dtype=np.float64)
        return expected_score_from_probs(np.stack([p for p, _, _ in answers]), values)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self.http.close()
        if self.server is not None:
            self.server.stop()

    on_release = close

    def __enter__(self) -> "ServedVLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServedVLM({self.served_name!r} at {self.base_url})"


def _local_tokenizer(path: str, trust_remote_code: bool):
    """The model's tokenizer when it is on disk (for the answer-token logit bias), else None."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - without it, answers are read from text only
        log.info("no local tokenizer for %s (%s): yes/no answers are read without a logit bias", path, exc)
        return None


def connect(engine: EngineConfig, model_ref: str, models_root: str | None = None, *, device: str = "auto",
            dtype: str = "auto", trust_remote_code: bool = False, image_caps: ImageCaps | None = None,
            max_new_tokens: int = 256) -> ServedVLM:
    """A client for `model_ref` at engine.endpoint, or on a server it launches (engine.launch), whose
    context is sized for requests of one image and `max_new_tokens` new tokens (`stage_max_model_len`)."""
    from .runtime import ModelNotAvailable, resolve_model_ref

    try:
        path = resolve_model_ref(model_ref, models_root)
    except ModelNotAvailable:
        if not engine.weights_elsewhere:
            raise
        path = model_ref
    tokenizer = _local_tokenizer(path, trust_remote_code)
    if image_caps is not None and image_caps.max_tiles:
        if not engine.launch:
            raise ValueError(f"image.max_tiles cannot be applied to a server richpref does not start ({engine.endpoint}): "
                             "cap the grid where that server is started (e.g. vLLM --hf-overrides with "
                             "image_grid_pinpoints), or drop image.max_tiles, or let richpref launch it (engine.launch)")
        from .vlm_grid import capped_model_dir

        path = str(capped_model_dir(path, image_caps.max_tiles))  # the server reads the capped grid
    if engine.launch:
        # `transformers serve` names the model by the path it serves (`served_by_path`); vLLM/SGLang take a served name.
        name = path if VLM_ENGINES[engine.launch].served_by_path else (engine.served_model or model_ref)
        from .vlm_server import stage_max_model_len

        server = LaunchedServer(engine, path, name, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                max_model_len=stage_max_model_len(path, max_new_tokens=max_new_tokens,
                                                                  caps=image_caps)).start()
        return ServedVLM(engine, name, path, server=server, tokenizer=tokenizer, image_caps=image_caps)
    return ServedVLM(engine, engine.served_model or model_ref, path, base_url=engine.endpoint, tokenizer=tokenizer,
                     image_caps=image_caps)


__all__ = ["RowFailure", "ServedVLM", "ServerBusy", "ServerUnavailable", "connect", "image_data_url"]
