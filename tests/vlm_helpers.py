"""Inputs of the VLM stages, shared by the critique, instruct, check and filter tests
(tests/tasks/) and tests/models/test_vlm_client.py: seeded noise images, three prompts, and the rows and
images an instruct or check/filter call takes; a fault-injecting proxy in front of a served VLM; what a
served answer must equal in process. Not a test module."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pyarrow as pa
from PIL import Image

from richpref.common.images import encode_png
from richpref.models.vlm import YES_NO, VisionLanguageModel


def image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


PROMPTS = ["a red apple on a wooden table", "two dogs playing near a lake", "a blue car in front of a white house"]


def instruct_input(n=3):
    rows = pa.table({"item_id": [f"i{k}" for k in range(n)], "prompt": PROMPTS[:n],
                     "critique": ["The apple is green.", "Only one dog.", "The car is red."][:n]})
    return rows, [encode_png(image(10 + k)) for k in range(n)]


def filter_input(n=3):
    rows = pa.table({"item_id": [f"f{k}" for k in range(n)], "candidate": pa.array([0] * n, pa.int32())})
    instructions = [["Make the apple red", "Remove the blue cup"], ["Add a second dog"], ["Turn the car blue"]][:n]
    images = {
        "original": [encode_png(image(30 + k)) for k in range(n)],
        "edited": [encode_png(image(40 + k)) for k in range(n)],
        "original_cutout": [encode_png(image(50 + k, (48, 64))) for k in range(n)],
        "edited_cutout": [encode_png(image(60 + k, (48, 64))) for k in range(n)],
    }
    return rows, PROMPTS[:n], instructions, images


class FaultProxy:
    """Forwards /v1/chat/completions to `upstream`; a request whose text holds a marker gets garbage
    (marker "GARBAGE") or HTTP 500 (marker "FAIL500"); the first `busy_for` requests get HTTP 503 (a
    loaded server's refusal), saying `Retry-After: retry_after` where given. `bodies`: the requests' JSON."""

    def __init__(self, upstream: str, busy_for: int = 0, retry_after: str | None = None) -> None:
        proxy = self
        self.busy_for = busy_for

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    proxy.bodies.append(json.loads(body))
                    busy, proxy.busy_for = proxy.busy_for > 0, proxy.busy_for - 1
                if busy:
                    return self._send(503, b'{"error": "overloaded"}', retry_after)
                if b"GARBAGE" in body:
                    return self._send(200, b"<html>this is not json</html>")
                if b"FAIL500" in body:
                    return self._send(500, b'{"error": "injected"}')
                resp = httpx.post(proxy.upstream + self.path[len("/v1"):], content=body,
                                  headers={"Content-Type": "application/json"}, timeout=120)
                self._send(resp.status_code, resp.content)

            def _send(self, code, data, retry_after=None):
                self.send_response(code)
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.upstream = upstream
        self.lock = threading.Lock()
        self.bodies: list[dict] = []  # every request's JSON, as sent
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def endoftext_split(local: VisionLanguageModel, img, prompt: str, max_new_tokens: int) -> str | None:
    """The in-process greedy text after the last <|endoftext|> the model wrote, or None if it wrote none.

    The tiny Qwen's generation config ends answers at <|im_end|> only, so it may write <|endoftext|>
    mid-answer; in-process decoding skips that special token, while transformers serve's Qwen reply
    parser closes the content at it and returns only what follows (vLLM and SGLang, and real Qwen
    configs that stop at <|endoftext|>, do not meet this)."""
    import torch

    tok = local.tokenizer
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    inputs = local._encode([img], [prompt])
    with torch.inference_mode():
        ids = local.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                   top_p=None, top_k=None)[0, inputs["input_ids"].shape[1]:].tolist()
    ids = ids[: next((k for k, t in enumerate(ids) if t in local._eos_ids()), len(ids))]
    if eot not in ids:
        return None
    last = len(ids) - 1 - ids[::-1].index(eot)
    return tok.decode(ids[last + 1:], skip_special_tokens=True).strip()


def same_text(served_text: str, local_text: str, local, img, prompt, max_new_tokens) -> bool:
    return served_text == local_text or served_text == endoftext_split(local, img, prompt, max_new_tokens)


def argmax_answer(local: VisionLanguageModel, images, prompts) -> list[float]:
    """What a one-token answer under the yes/no logit bias must be: the most likely single spelling."""
    spellings = [s for group in YES_NO for s in group]
    probs = local.option_probabilities(images, prompts, [(s,) for s in spellings])
    return [1.0 if spellings[k] in YES_NO[0] else 0.0 for k in probs.argmax(axis=1)]
