"""What every stage config shares: unknown keys are errors, and the runtime-only fields; and what a
run may be named."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Also left out: how a stage runs, not what it computes (onnxruntime providers, torch.compile, memory
# layout, whether a pair's questions share one image prefix).
RUNTIME_FIELDS = frozenset({"batch_size", "device", "dtype", "share_image_prefix", "providers", "compile",
                            "channels_last"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageConfig(_Strict):
    batch_size: int = Field(8, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_name(run: str) -> str:
    if not RUN_NAME.match(run or ""):
        raise ValueError(
            f"run name {run!r} is not allowed: use letters, digits, '.', '_' or '-', starting with a letter or digit, "
            "at most 128 (it names a folder under runs/)"
        )
    return run
