"""Where a VLM stage's model runs, and how many image tokens it may spend.

`engine` chooses the backend of critique, instruct, filter and the VLM rewards, one of the engines
declared in richpref/schemas/vlm_engines/ (which the allowed `backend` and `launch` values come from):

- `backend: transformers` — in-process `generate` (the default; what the tiny profile uses);
- `backend: server` with `endpoint: http://HOST:PORT/v1` — an OpenAI-compatible server the user runs;
- `backend: server` with `launch: vllm | sglang | transformers` — richpref starts the server on the
  worker's device, waits for its health check, and stops it when the stage ends.

The head judges (rewards `hpsv3`, `edit_reward`) are not chat models: a chat server cannot return
their head's value. They take `launch: richpref` (richpref's own judge server, `richpref serve
judge`, models/judge_server.py) or an `endpoint` where one runs; the chat launchers are refused for
them, and `launch: richpref` for everything else.

Only `backend` is part of a stage's content key: the endpoint and the client's concurrency, timeouts
and retries change how fast outputs come, not what they are. The launcher is part of the key of the
stages that read probabilities (check's yes/no questions, the `vlm_score` reward): `transformers serve`
returns no logprobs, so its answers come back as 0/1, while vLLM and SGLang give probabilities
(`answer_key`). `image` caps the pixels of every image before the model sees it (both backends), so
it is part of the key. A launched vLLM gets `--max-model-len` from the stage's needs
(`max_model_len`), so a model with a long context (Qwen2.5-VL: 128k) does not need a KV cache for all of it.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .vlm_engines import BACKENDS, CHAT_LAUNCHERS, LAUNCHERS, VLM_ENGINES

# CHAT_LAUNCHERS: OpenAI-compatible chat servers; the rest of LAUNCHERS serve the head judges.


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal[BACKENDS] = "transformers"  # in-process, or `server` (the backends of schemas/vlm_engines/)
    endpoint: str | None = None  # base URL of a running server, e.g. http://10.0.0.5:8000/v1
    launch: Literal[LAUNCHERS] | None = None  # start this server instead (a launched engine of schemas/vlm_engines/)
    served_model: str | None = None  # model name the server expects (default: the stage's model)
    extra_args: list[str] = Field(default_factory=list)  # appended to the launch command
    port: int | None = Field(None, ge=1, le=65535)  # launch port; default: a free one
    startup_timeout_s: float = Field(900.0, gt=0)  # a server not healthy by then fails the stage
    concurrency: int = Field(32, ge=1)  # requests in flight (keeps the server's batch full)
    request_timeout_s: float = Field(300.0, gt=0)
    retries: int = Field(4, ge=0)  # per request, on connection errors, timeouts, 429 and 5xx
    restarts: int = Field(1, ge=0)  # relaunches of a launched server that died mid-stage
    top_logprobs: int = Field(20, ge=1, le=20)  # alternatives asked for at a yes/no or score answer

    # Fields that change what the stage computes (the rest is transport).
    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("backend",)

    @model_validator(mode="after")
    def _consistent(self) -> "EngineConfig":
        if self.backend == "server" and (self.endpoint is None) == (self.launch is None):
            raise ValueError("engine.backend=server needs exactly one of engine.endpoint (a running "
                             "OpenAI-compatible server, e.g. http://HOST:8000/v1) or engine.launch "
                             f"({' | '.join(LAUNCHERS)})")
        if self.backend == "transformers" and (self.endpoint or self.launch):
            raise ValueError("engine.endpoint / engine.launch need engine.backend=server")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"engine.endpoint {self.endpoint!r} must be an http(s) URL ending in /v1")
        return self

    max_model_len: int | None = Field(None, ge=256)  # vLLM --max-model-len; unset: from the stage's needs

    @property
    def weights_elsewhere(self) -> bool:
        """A server someone else runs (`endpoint`) holds the model: this machine neither finds, fits nor
        loads its weights. A server richpref launches (`launch`) loads them from here."""
        return self.endpoint is not None

    def answer_key(self) -> dict | None:
        """What the launcher adds to the key of a stage that reads answer probabilities: the launcher
        (transformers serve answers 0/1, vLLM / SGLang give probabilities); None for a running
        endpoint or in-process, so their keys stay."""
        return {"launch": self.launch} if self.launch else None

    def key_data(self) -> dict | None:
        """The part of the content key; None (left out) at the default, so existing keys stay."""
        data = {f: getattr(self, f) for f in self.KEY_FIELDS}
        return None if data == {"backend": "transformers"} else data


class ImageCaps(BaseModel):
    """Pixel bounds applied to each image (aspect ratio kept) before either backend encodes it.

    Qwen2.5-VL spends one token per 28x28 pixels, so `max_pixels` caps its image tokens at
    max_pixels / 784; LLaVA-OneVision tiles an image into a grid of 384 px crops (anyres, up to 3x3),
    so `max_pixels` of 384*384*k keeps it to about k crops plus the base view. `max_tiles` caps that
    grid without shrinking the image (anyres models only; see models/vlm_grid.py).
    """

    model_config = ConfigDict(extra="forbid")

    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    max_tiles: int | None = Field(None, ge=1)  # LLaVA-OneVision / LLaVA-NeXT anyres grid: tiles per image

    @model_validator(mode="after")
    def _ordered(self) -> "ImageCaps":
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"image.min_pixels={self.min_pixels} > image.max_pixels={self.max_pixels}")
        return self

    def key_data(self) -> dict | None:
        data = self.model_dump()
        if data.pop("max_tiles") is not None:  # left out when unset: keys made before it existed stay
            data["max_tiles"] = self.max_tiles
        return None if all(v is None for v in data.values()) else data

    def apply(self, image):
        """`image` resized (bicubic, aspect kept) into [min_pixels, max_pixels]; unchanged if inside."""
        w, h = image.size
        area = w * h
        target = None
        if self.max_pixels and area > self.max_pixels:
            target = self.max_pixels
        elif self.min_pixels and area < self.min_pixels:
            target = self.min_pixels
        if target is None:
            return image
        scale = (target / area) ** 0.5
        size = (max(1, int(w * scale)), max(1, int(h * scale)))
        from PIL import Image

        return image.resize(size, Image.Resampling.BICUBIC)


def key_view(model: BaseModel, data: dict) -> dict:
    """`data` (the JSON dump of `model`) with every keyed block replaced by its `key_data`, or left
    out where that is None: a profile that does not set them keeps the key it had before they existed."""
    for name in type(model).model_fields:
        if name not in data:
            continue
        value = getattr(model, name)
        if hasattr(value, "key_data"):
            kd = value.key_data()
            if kd is None:
                del data[name]
            else:
                data[name] = kd
        elif isinstance(value, BaseModel):
            key_view(value, data[name])
        elif isinstance(value, dict):
            for k, item in value.items():
                if isinstance(item, BaseModel):
                    key_view(item, data[name][k])
    return data


def check_launcher(engine: EngineConfig, what: str, head_judge: bool) -> None:
    """Refuse a launcher that cannot serve `what`: chat launchers for a head judge, `richpref` for the rest."""
    if head_judge and engine.launch in CHAT_LAUNCHERS:
        raise ValueError(f"{what}: engine.launch={engine.launch} serves chat answers, not a reward head's value; "
                         "use engine.launch: richpref (richpref's judge server) or an engine.endpoint where "
                         "`richpref serve judge` runs")
    if not head_judge and engine.launch and VLM_ENGINES[engine.launch].head:
        raise ValueError(f"{what}: engine.launch={engine.launch} serves the head judges (rewards hpsv3, edit_reward) "
                         f"only; use one of {', '.join(CHAT_LAUNCHERS)}")


__all__ = ["CHAT_LAUNCHERS", "EngineConfig", "ImageCaps", "LAUNCHERS", "check_launcher", "key_view"]
