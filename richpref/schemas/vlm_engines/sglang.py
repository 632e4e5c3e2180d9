"""SGLang (`engine.launch: sglang`): `python -m sglang.launch_server`."""
from __future__ import annotations

import sys

from . import VLMEngine


def command(model_path: str, served_name: str, host: list[str], *, device: str, dtype: str, trust_remote_code: bool,
            extra_args: list[str], max_model_len: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, *host,
           "--served-model-name", served_name, "--dtype", dtype]
    return cmd + (["--trust-remote-code"] if trust_remote_code else [])


KINDS = (VLMEngine("sglang", backend="server", loader="vlm_client:connect", rank=3, launched=True, command=command,
                   install="install SGLang on the GPU worker (pip install 'sglang[all]')"),)
