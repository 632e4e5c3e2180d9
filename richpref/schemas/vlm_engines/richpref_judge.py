"""richpref's judge server (`engine.launch: richpref`, `richpref serve judge`, models/judge_server.py):
serves the head judges (rewards hpsv3, edit_reward), whose score is a head's value and no chat answer;
their reward loader is its client (models/rewards/served_head.py), which passes --kind and the
judge's options in `extra_args`."""
from __future__ import annotations

import sys

from . import VLMEngine


def command(model_path: str, served_name: str, host: list[str], *, device: str, dtype: str, trust_remote_code: bool,
            extra_args: list[str], max_model_len: int | None) -> list[str]:
    return [sys.executable, "-m", "richpref.models.judge_server", "--model", model_path, *host,
            "--device", device, "--dtype", dtype]


KINDS = (VLMEngine("richpref", backend="server", rank=5, launched=True, head=True, command=command,
                   install="check the judge's model and backbone paths in the log"),)
