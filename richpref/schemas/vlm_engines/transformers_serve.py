"""`transformers serve` (`engine.launch: transformers`): names the model by the path it serves and
returns no logprobs, so yes/no answers and ratings come back 0/1."""
from __future__ import annotations

import sys
from pathlib import Path

from . import VLMEngine


def command(model_path: str, served_name: str, host: list[str], *, device: str, dtype: str, trust_remote_code: bool,
            extra_args: list[str], max_model_len: int | None) -> list[str]:
    exe = Path(sys.executable).parent / "transformers"
    cmd = [str(exe) if exe.exists() else "transformers", "serve", model_path, *host,
           "--device", "auto" if device == "auto" else device, "--dtype", dtype, "--log-level", "info"]
    return cmd + (["--trust-remote-code"] if trust_remote_code else [])


KINDS = (VLMEngine("transformers", backend="server", loader="vlm_client:connect", rank=4, launched=True,
                   command=command, served_by_path=True,
                   install="install the serving extra (pip install 'transformers[serving]', which brings openai, "
                           "fastapi, uvicorn)"),)
