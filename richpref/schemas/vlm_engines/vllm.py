"""vLLM (`engine.launch: vllm`): `vllm serve`, prefix caching, one image per request unless a judge asks
for more, and a context sized for the stage (`--max-model-len`) unless `extra_args` sets one."""
from __future__ import annotations

import shutil

from . import VLMEngine


def command(model_path: str, served_name: str, host: list[str], *, device: str, dtype: str, trust_remote_code: bool,
            extra_args: list[str], max_model_len: int | None) -> list[str]:
    cmd = [shutil.which("vllm") or "vllm", "serve", model_path, *host, "--served-model-name", served_name,
           "--enable-prefix-caching", "--dtype", dtype, "--limit-mm-per-prompt", '{"image": 1}']
    if max_model_len and not any(a.split("=")[0] == "--max-model-len" for a in extra_args):
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd + (["--trust-remote-code"] if trust_remote_code else [])


KINDS = (VLMEngine("vllm", backend="server", loader="vlm_client:connect", rank=2, launched=True, command=command,
                   install="install vLLM on the GPU worker (pip install vllm)",
                   images_flag="--limit-mm-per-prompt"),)
