"""A head judge (hpsv3, edit_reward) through richpref's judge server (`models/judge_server.py`), with
the interface of the in-process judge: `score` (hpsv3), `score_edits` and `score_pairs` (edit_reward).

The reward's `engine` picks the server: `backend: server` with `endpoint: http://HOST:PORT/v1` (a
`richpref serve judge` someone runs), or `launch: richpref` (this client starts one on 127.0.0.1 as an
owned child with the spec's model and options, waits for /health, and stops it by pid on `close`).
Images travel as lossless PNG, so the server scores the pixels the in-process judge would; each
request carries the client's `batch_size`, so it is scored in the same model batches. Requests run
`engine.concurrency` at a time and are retried (`engine.retries`) on connection errors and 5xx; a
launched server that died is started again (`engine.restarts`). A failed request fails the shard: a
score is never made up.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from .base import batches, check_lengths

log = logging.getLogger("richpref")

# The judge server's routes and request fields per kind (models/judge_server.py).
ROUTES = {"hpsv3": "/v1/score", "edit_reward": "/v1/score_edits"}
FIELDS = {"hpsv3": ("images", "prompts"), "edit_reward": ("originals", "edits", "instructions")}
IMAGE_FIELDS = ("images", "originals", "edits")


class JudgeServerError(RuntimeError):
    """The judge server cannot be reached, refused a request, or judges another kind."""


def _b64(images) -> list[str]:
    from ..vlm_client import image_data_url

    return [image_data_url(im) for im in images]


class ServedHeadJudge:
    kind = ""

    def __init__(self, path: str, *, engine, device: str = "auto", dtype: str = "auto", **options) -> None:
        from ..vlm_server import LaunchedServer

        self.engine, self.model_id = engine, path
        self.server = None
        if engine.launch:
            judge_args = ["--kind", self.kind]
            for opt, value in options.items():
                if value is not None:
                    judge_args += [f"--{opt.replace('_', '-')}", str(value)]
            launched = engine.model_copy(update={"extra_args": judge_args + list(engine.extra_args)})
            self.server = LaunchedServer(launched, path, self.kind, device=device, dtype=dtype).start()
        self.http = httpx.Client(timeout=engine.request_timeout_s, limits=httpx.Limits(max_connections=engine.concurrency))
        self.restarts_left = engine.restarts
        info = self._call("GET", "/judge")
        if info.get("kind") != self.kind:
            self.close()
            raise JudgeServerError(f"the judge server at {self.base_url} judges {info.get('kind')!r}, not {self.kind!r}: "
                                   f"point engine.endpoint at a `richpref serve judge --kind {self.kind}`")
        self.dtype = info.get("dtype", "float32")
        if not engine.launch:
            self.model_id = info.get("model", path)

    @property
    def base_url(self) -> str:
        return self.server.base_url if self.server is not None else self.engine.endpoint.rstrip("/")

    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        url = f"{self.base_url}{route}"
        for attempt in range(self.engine.retries + 1):
            try:
                resp = self.http.request(method, url, json=body)
                if resp.status_code < 500:
                    data = resp.json()
                    if resp.status_code != 200:
                        raise JudgeServerError(f"the judge server at {url} refused the request ({resp.status_code}): "
                                               f"{data.get('error', data)}")
                    return data
                why = f"{resp.status_code}: {resp.text[:400]}"
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}"
                if self.server is not None and not self.server.alive():
                    if self.restarts_left <= 0:
                        raise JudgeServerError(f"the launched judge server (pid {self.server.pid}) died; log ends "
                                               f"with:\n{self.server.log_tail()}") from None
                    self.restarts_left -= 1
                    log.warning("judge server died (%s); restarting it", why)
                    self.server.start()
                    continue
            if attempt < self.engine.retries:
                time.sleep(min(8.0, 0.5 * 2 ** attempt))
        raise JudgeServerError(f"the judge server at {url} failed after {self.engine.retries + 1} attempt(s) ({why}); "
                               "fix: start it (`richpref serve judge --kind ... --model ...`) or check engine.endpoint")

    def _scores(self, fields: dict[str, list], batch_size: int) -> np.ndarray:
        """Scores of the items in `fields` (equal-length lists), one request per `batch_size` items."""
        n = len(next(iter(fields.values())))
        slices = list(batches(n, batch_size))

        def one(sl: slice) -> list:
            body = {k: (_b64(v[sl]) if k in IMAGE_FIELDS else list(v[sl])) for k, v in fields.items()}
            scores = self._call("POST", ROUTES[self.kind].removeprefix("/v1"), {**body, "batch_size": batch_size})["scores"]
            if len(scores) != sl.stop - sl.start:
                raise JudgeServerError(f"the judge server answered {len(scores)} scores for {sl.stop - sl.start} items")
            return scores

        with ThreadPoolExecutor(max_workers=max(1, min(self.engine.concurrency, len(slices)))) as pool:
            chunks = list(pool.map(one, slices))
        return np.array([np.nan if v is None else v for c in chunks for v in c], dtype=np.float64)

    def close(self) -> None:
        self.http.close()
        if self.server is not None:
            self.server.stop()
            self.server = None

    on_release = close


class ServedHPSv3(ServedHeadJudge):
    kind = "hpsv3"

    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        check_lengths(images, prompts)
        return self._scores({"images": list(images), "prompts": list(prompts)}, batch_size)


class ServedEditReward(ServedHeadJudge):
    kind = "edit_reward"
    pairwise = True

    def score_edits(self, originals, edits, instructions, *, batch_size: int = 8) -> np.ndarray:
        if not len(originals) == len(instructions) == len(edits):
            raise ValueError(f"{len(originals)} originals, {len(instructions)} instructions, {len(edits)} edits: "
                             "give one of each per pair")
        return self._scores({"originals": list(originals), "edits": list(edits), "instructions": list(instructions)},
                            batch_size)

    def score_pairs(self, originals, edits, prompts, *, batch_size: int = 8) -> np.ndarray:
        """(n, 2): the original judged as an unchanged edit of itself, and the edit (as EditReward)."""
        if len(originals) != len(edits):
            raise ValueError(f"{len(originals)} originals but {len(edits)} edits")
        return np.stack([self.score_edits(originals, originals, prompts, batch_size=batch_size),
                         self.score_edits(originals, edits, prompts, batch_size=batch_size)], axis=1)


SERVED = {"hpsv3": ServedHPSv3, "edit_reward": ServedEditReward}

__all__ = ["FIELDS", "IMAGE_FIELDS", "JudgeServerError", "ROUTES", "SERVED", "ServedEditReward", "ServedHPSv3", "ServedHeadJudge"]
