"""What every stage config shares: unknown keys are errors, and the runtime-only fields; what a
run may be named; and how two configs' values differ, for messages."""
from __future__ import annotations

import json
import re
from typing import Any, Literal

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


def setting_changes(before: Any, now: Any, key: str = "") -> list[str]:
    """'key: old → new' for each value that differs between two configs' dumps (JSON values), by dotted
    key into sections and list items of the same length (`data[0].path`), e.g. for a refusal to name
    which of a --set's or an edited file's values made the difference."""
    if isinstance(before, dict) and isinstance(now, dict):
        return [c for k in sorted(before.keys() | now.keys())
                for c in setting_changes(before.get(k), now.get(k), f"{key}.{k}" if key else k)]
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        return [c for i, (a, b) in enumerate(zip(before, now)) for c in setting_changes(a, b, f"{key}[{i}]")]
    if before == now:
        return []

    def shown(value: Any) -> str:  # a whole section or list cut in its middle; a path or name whole
        text = json.dumps(value)
        return text if isinstance(value, str) or len(text) <= 80 else f"{text[:38]} ... {text[-38:]}"

    return [f"{key}: {shown(before)} → {shown(now)}"]
