"""Starting and stopping a launched VLM engine (schemas/vlm_engines/: an OpenAI-compatible server such
as vLLM, SGLang or `transformers serve`, or richpref's judge server for the head judges).

The server is an owned child (`richpref.common.procs`): its own process group, killed with this process,
stopped by pid when the stage ends. Startup is bounded: a server that exits or is not healthy within
`startup_timeout_s` fails the stage with the tail of its log and what to do about it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from richpref.common.procs import free_port, spawn_owned, stop_owned
from ..schemas.serving import EngineConfig, ImageCaps
from ..schemas.vlm_engines import LAUNCHERS, VLM_ENGINES


class ServerStartError(RuntimeError):
    """A launched server exited or did not become healthy in time."""


def _gpu_env(device: str) -> dict[str, str]:
    """vLLM and SGLang take the device from CUDA_VISIBLE_DEVICES: 'cuda:1' -> '1'."""
    env = dict(os.environ)
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    return env


# Text tokens of one request (template, prompt, instructions, chat markup), generously; the margin
# over the whole need; and the fallback image budget where a model's config does not tell.
TEXT_TOKENS = 2048
MARGIN = 1.25
FALLBACK_IMAGE_TOKENS = 8192


def _read_json(folder: str, name: str) -> dict:
    try:
        return json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def image_tokens(model_path: str, caps: ImageCaps | None = None) -> int:
    """The most tokens one image can cost `model_path` (a local checkpoint folder) under `caps`.

    Qwen2-VL / Qwen2.5-VL: one token per (patch x merge)² pixels (28x28) up to the processor's
    max_pixels (12845056: 16384 tokens) or `caps.max_pixels`; LLaVA-OneVision / LLaVA-NeXT: (tiles of
    the anyres grid, at most 9 or `caps.max_tiles`, + the base view) x (image_size / patch_size)²,
    plus 10% for the row-end tokens. Unknown layouts: FALLBACK_IMAGE_TOKENS.
    """
    pre, config = _read_json(model_path, "preprocessor_config.json"), _read_json(model_path, "config.json")
    if "merge_size" in pre and "patch_size" in pre:
        max_pixels = pre.get("max_pixels") or (pre.get("size") or {}).get("longest_edge") or 12845056
        if caps is not None and caps.max_pixels:
            max_pixels = min(max_pixels, caps.max_pixels)
        return math.ceil(max_pixels / (pre["patch_size"] * pre["merge_size"]) ** 2)
    vision = config.get("vision_config") or {}
    if config.get("image_grid_pinpoints") and vision.get("image_size") and vision.get("patch_size"):
        side = vision["image_size"]
        grid = max((h // side) * (w // side) for h, w in config["image_grid_pinpoints"])
        tiles = min(grid, 9, (caps.max_tiles if caps is not None and caps.max_tiles else grid)) + 1
        return math.ceil(tiles * (side // vision["patch_size"]) ** 2 * 1.1)
    return FALLBACK_IMAGE_TOKENS


def context_length(model_path: str) -> int | None:
    """The model's own context (max_position_embeddings of its text model), when its config says."""
    config = _read_json(model_path, "config.json")
    for block in (config.get("text_config") or {}, config):
        if block.get("max_position_embeddings"):
            return int(block["max_position_embeddings"])
    return None


def stage_max_model_len(model_path: str, *, max_new_tokens: int, caps: ImageCaps | None = None,
                        images: int = 1) -> int:
    """What a stage needs of a served model's context: (TEXT_TOKENS + `images` images' tokens +
    `max_new_tokens`) x MARGIN, rounded up to 1024, at most the model's own context. vLLM sizes its
    KV cache for this instead of the model's full context (Qwen2.5-VL: 128k, which does not fit next
    to a 7B model on a 24 GB GPU)."""
    need = math.ceil((TEXT_TOKENS + images * image_tokens(model_path, caps) + max_new_tokens) * MARGIN)
    need = -(-need // 1024) * 1024
    own = context_length(model_path)
    return min(need, own) if own else need


def launch_command(launch: str, model_path: str, served_name: str, port: int, *, device: str = "auto",
                   dtype: str = "auto", trust_remote_code: bool = False, extra_args: list[str] = (),
                   max_model_len: int | None = None) -> list[str]:
    """The command line that serves `model_path` as `served_name` on 127.0.0.1:`port`: the launched
    engine's own (schemas/vlm_engines/<kind>.py), then `extra_args`."""
    decl = VLM_ENGINES.get(launch)
    if decl is None or not decl.launched:
        raise ValueError(f"unknown launcher {launch!r}; use one of {', '.join(LAUNCHERS)}")
    host = ["--host", "127.0.0.1", "--port", str(port)]
    return decl.command(model_path, served_name, host, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                        extra_args=list(extra_args), max_model_len=max_model_len) + list(extra_args)


class LaunchedServer:
    """One server process serving one model; `base_url` ends in /v1."""

    def __init__(self, engine: EngineConfig, model_path: str, served_name: str, *, device: str = "auto",
                 dtype: str = "auto", trust_remote_code: bool = False, log_dir: str | None = None,
                 max_model_len: int | None = None) -> None:
        self.max_model_len = engine.max_model_len or max_model_len
        self.engine = engine
        self.launch = engine.launch
        self.model_path = model_path
        self.served_name = served_name
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        # None: a temporary folder made at start, removed when the server is stopped, kept when it failed
        # to start (the error names its log)
        self.log_dir = Path(log_dir) if log_dir else None
        self._own_log_dir = log_dir is None
        self.proc = None
        self.port = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log_path(self) -> Path | None:
        return self.log_dir / f"{self.launch}-{self.port}.log" if self.log_dir is not None else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None:  # never started
            return "(no log)"
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> "LaunchedServer":
        """Start the server and wait until GET /health answers 200, within engine.startup_timeout_s."""
        self.stop(keep_log=True)  # a restart: the last process's log stays beside the new one
        self.port = self.engine.port or free_port()
        cmd = launch_command(self.launch, self.model_path, self.served_name, self.port, device=self.device,
                             dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                             extra_args=self.engine.extra_args, max_model_len=self.max_model_len)
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="richpref-vlm-server-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = spawn_owned(cmd, name=f"{self.launch}:{self.served_name}", log_path=str(self.log_path),
                                    env=_gpu_env(self.device))
        except FileNotFoundError as exc:
            raise ServerStartError(f"cannot start {self.launch} ({exc}); {VLM_ENGINES[self.launch].install}") from None
        self.starts += 1
        self._wait_healthy(cmd)
        return self

    def _wait_healthy(self, cmd: list[str]) -> None:
        deadline = time.monotonic() + self.engine.startup_timeout_s
        health = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._keep_log()
                raise ServerStartError(
                    f"{self.launch} server for {self.model_path} exited with code {code} before it was healthy.\n"
                    f"command: {' '.join(cmd)}\nlog {self.log_path} ends with:\n{self.log_tail()}\n"
                    f"fix: check the log; if the launcher is missing, {VLM_ENGINES[self.launch].install}")
            try:
                if httpx.get(health, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        tail = self.log_tail()
        self._keep_log()
        raise ServerStartError(
            f"{self.launch} server for {self.model_path} was not healthy within "
            f"engine.startup_timeout_s={self.engine.startup_timeout_s:g}s (stopped it).\n"
            f"command: {' '.join(cmd)}\nlog {self.log_path} ends with:\n{tail}\n"
            "fix: raise engine.startup_timeout_s when the model is large or the disk slow, or check the log")

    def _keep_log(self) -> None:
        """Stopped after a failed start: its log, which the error names, outlives this object."""
        self.stop(keep_log=True)
        self._own_log_dir = False

    def stop(self, keep_log: bool = False) -> None:
        if self.proc is not None:
            stop_owned(self.proc, timeout=15.0)
            self.proc = None
        if not keep_log and self._own_log_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None

    def __enter__(self) -> "LaunchedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["LaunchedServer", "ServerStartError", "image_tokens", "launch_command", "stage_max_model_len"]
