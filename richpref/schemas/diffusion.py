"""Diffusion pipeline settings shared by the sample and edit stages.

`scheduler` changes the images, so it is part of the stage's cache key (only once set: a profile
that never names one keeps its earlier key). `compile` and `channels_last` change how fast the
same computation runs, not what it computes, so they are runtime fields (see RUNTIME_FIELDS).
"""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

# Short names for the schedulers users reach for; any diffusers scheduler class name works too.
SCHEDULER_ALIASES: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsolver++_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
}


def check_scheduler_name(name: str | None) -> str | None:
    if name is None or name in SCHEDULER_ALIASES or (name.isidentifier() and name.endswith("Scheduler")):
        return name
    raise ValueError(f"scheduler {name!r}: use one of {', '.join(SCHEDULER_ALIASES)} or a diffusers scheduler "
                     "class name such as 'UniPCMultistepScheduler'")


class PipelineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Fields hashed into the cache key only when set (added after runs were keyed without them).
    HASHED_WHEN_SET: ClassVar[frozenset[str]] = frozenset({"scheduler"})

    scheduler: str | None = None  # alias (unipc, dpmsolver++, ...) or class name; with `steps`
    compile: bool = False  # torch.compile the denoiser (first batches pay the compilation)
    channels_last: bool = False  # channels-last memory layout for the UNet, ControlNet and VAE

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str | None) -> str | None:
        return check_scheduler_name(v)
