"""Starting and stopping an OpenAI-compatible VLM server (vLLM, SGLang or `transformers serve`).

The server is an owned child (`richpref.procs`): its own process group, killed with this process,
stopped by pid when the stage ends. Startup is bounded: a server that exits or is not healthy within
`startup_timeout_s` fails the stage with the tail of its log and what to do about it.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ..procs import spawn_owned, stop_owned
from ..schemas.serving import EngineConfig


class ServerStartError(RuntimeError):
    """A launched server exited or did not become healthy in time."""


INSTALL_HINT = {
    "vllm": "install vLLM on the GPU worker (pip install vllm)",
    "sglang": "install SGLang on the GPU worker (pip install 'sglang[all]')",
    "transformers": "install the serving extra (pip install 'transformers[serving]', which brings openai, fastapi, uvicorn)",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_env(device: str) -> dict[str, str]:
    """vLLM and SGLang take the device from CUDA_VISIBLE_DEVICES: 'cuda:1' -> '1'."""
    env = dict(os.environ)
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    return env


def launch_command(launch: str, model_path: str, served_name: str, port: int, *, device: str = "auto",
                   dtype: str = "auto", trust_remote_code: bool = False, extra_args: list[str] = ()) -> list[str]:
    """The command line that serves `model_path` as `served_name` on 127.0.0.1:`port`."""
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if launch == "vllm":
        cmd = [shutil.which("vllm") or "vllm", "serve", model_path, *host, "--served-model-name", served_name,
               "--enable-prefix-caching", "--dtype", dtype, "--limit-mm-per-prompt", '{"image": 1}']
        cmd += ["--trust-remote-code"] if trust_remote_code else []
    elif launch == "sglang":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, *host,
               "--served-model-name", served_name, "--dtype", dtype]
        cmd += ["--trust-remote-code"] if trust_remote_code else []
    elif launch == "transformers":
        exe = Path(sys.executable).parent / "transformers"
        cmd = [str(exe) if exe.exists() else "transformers", "serve", model_path, *host,
               "--device", "auto" if device == "auto" else device, "--dtype", dtype, "--log-level", "info"]
        cmd += ["--trust-remote-code"] if trust_remote_code else []
    else:
        raise ValueError(f"unknown launcher {launch!r}; use vllm, sglang or transformers")
    return cmd + list(extra_args)


class LaunchedServer:
    """One server process serving one model; `base_url` ends in /v1."""

    def __init__(self, engine: EngineConfig, model_path: str, served_name: str, *, device: str = "auto",
                 dtype: str = "auto", trust_remote_code: bool = False, log_dir: str | None = None) -> None:
        self.engine = engine
        self.launch = engine.launch
        self.model_path = model_path
        self.served_name = served_name
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="richpref-vlm-server-"))
        self.proc = None
        self.port = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.launch}-{self.port}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> "LaunchedServer":
        """Start the server and wait until GET /health answers 200, within engine.startup_timeout_s."""
        self.stop()
        self.port = self.engine.port or free_port()
        cmd = launch_command(self.launch, self.model_path, self.served_name, self.port, device=self.device,
                             dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                             extra_args=self.engine.extra_args)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = spawn_owned(cmd, name=f"{self.launch}:{self.served_name}", log_path=str(self.log_path),
                                    env=_gpu_env(self.device))
        except FileNotFoundError as exc:
            raise ServerStartError(f"cannot start {self.launch} ({exc}); {INSTALL_HINT[self.launch]}") from None
        self.starts += 1
        self._wait_healthy(cmd)
        return self

    def _wait_healthy(self, cmd: list[str]) -> None:
        deadline = time.monotonic() + self.engine.startup_timeout_s
        health = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ServerStartError(
                    f"{self.launch} server for {self.model_path} exited with code {code} before it was healthy.\n"
                    f"command: {' '.join(cmd)}\nlog {self.log_path} ends with:\n{self.log_tail()}\n"
                    f"fix: check the log; if the launcher is missing, {INSTALL_HINT[self.launch]}")
            try:
                if httpx.get(health, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise ServerStartError(
            f"{self.launch} server for {self.model_path} was not healthy within "
            f"engine.startup_timeout_s={self.engine.startup_timeout_s:g}s (stopped it).\n"
            f"command: {' '.join(cmd)}\nlog {self.log_path} ends with:\n{tail}\n"
            "fix: raise engine.startup_timeout_s when the model is large or the disk slow, or check the log")

    def stop(self) -> None:
        if self.proc is not None:
            stop_owned(self.proc, timeout=15.0)
            self.proc = None

    def __enter__(self) -> "LaunchedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["LaunchedServer", "ServerStartError", "free_port", "launch_command"]
