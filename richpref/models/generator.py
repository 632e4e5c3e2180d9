"""Text-to-image generation with diffusers: SD 1.5, SDXL (UNet) and the flow-matching SD3/SD3.5,
FLUX.1 and Qwen-Image, each called with its own arguments (models/families.py).

Reproducibility contract: every image gets its own CPU `torch.Generator` seeded with its seed, so an
image's noise depends only on its seed, never on which other items shared its batch. CPU generators
give the same noise on every machine, whatever device the pipeline runs on. A rerun with the same
batches is byte-identical on CPU; the same item in a different batch can differ by a grey level in a
few pixels (batched matmuls round differently), which is why shards keep their batch composition.
"""
from __future__ import annotations

import gc
import logging
import os
from typing import Any

import torch
from PIL import Image

from .runtime import resolve_device, resolve_dtype

log = logging.getLogger("richpref")


def diffusers_dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """The `from_pretrained` keyword for a dtype: `dtype` in recent diffusers, `torch_dtype` before."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401 - only probing

        return {"dtype": dtype}
    except ImportError:
        return {"torch_dtype": dtype}


def quiet_loading() -> None:
    """diffusers' bar while a pipeline loads ("Loading pipeline components...") follows
    HF_HUB_DISABLE_PROGRESS_BARS, as the Hub's downloads do: richpref sets it by default (the user's env
    wins), and diffusers does not read it. Its sampling bars are off always (`set_progress_bar_config`)."""
    from diffusers.utils import logging as diffusers_logging

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in {"1", "ON", "YES", "TRUE"}:
        diffusers_logging.disable_progress_bar()


def make_scheduler(name: str, config: Any) -> Any:
    """A diffusers scheduler from a checkpoint's scheduler config: `name` is an alias ("unipc",
    "dpmsolver++", ... see schemas/diffusion.py) or a class name (e.g. "EulerDiscreteScheduler")."""
    import diffusers

    from ..schemas.diffusion import SCHEDULER_ALIASES

    class_name, options = SCHEDULER_ALIASES.get(name, (name, {}))
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown diffusers scheduler {name!r} (expected an alias such as 'unipc' or a class name "
                         "such as 'DDIMScheduler')")
    return cls.from_config(config, **options)


def apply_pipeline_settings(pipe: Any, *, scheduler: str | None = None, compile: bool = False,
                            channels_last: bool = False) -> Any:
    """Swap the scheduler, set the channels-last layout and/or torch.compile the denoiser, in place.

    channels_last and compile leave the computation as it is (the layout and the kernels change,
    within float rounding), so they are runtime settings; the scheduler changes the images."""
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    modules = [getattr(pipe, name, None) for name in ("unet", "controlnet", "vae")]
    if channels_last:
        for m in modules:
            if isinstance(m, torch.nn.Module):
                m.to(memory_format=torch.channels_last)
    if compile:
        for name in ("unet", "transformer"):  # the denoiser: a UNet, or a flow-matching transformer
            if isinstance(getattr(pipe, name, None), torch.nn.Module):
                setattr(pipe, name, torch.compile(getattr(pipe, name)))
    return pipe


def cpu_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per item: per-item noise that does not depend on the batch or the device."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def release_pipeline(pipe: Any) -> None:
    """Drop a pipeline's weights from memory (and the CUDA cache) as soon as the caller is done."""
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def without_safety_checker(path: str) -> dict[str, Any]:
    """`from_pretrained` keywords that skip loading a pipeline's safety checker, if it lists one."""
    from diffusers import DiffusionPipeline

    if "safety_checker" not in DiffusionPipeline.load_config(path):
        return {}
    return {"safety_checker": None, "requires_safety_checker": False}


class TextToImage:
    """A loaded text-to-image pipeline.

    `DiffusionPipeline.from_pretrained` reads the checkpoint's model_index.json and picks the class
    (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline,
    QwenImagePipeline); `family` (models/families.py) says which arguments each call takes.
    """

    def __init__(self, pipe: Any, model_id: str, device: torch.device, dtype: torch.dtype) -> None:
        from .families import detect_pipeline_family

        self.family = detect_pipeline_family(pipe, what=f"text-to-image model {model_id}")
        self.pipe = pipe
        self.model_id = model_id
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(
        cls, path: str, *, device: str = "auto", dtype: str = "auto", scheduler: str | None = None,
        variant: str | None = None, compile: bool = False, channels_last: bool = False,
        safety_checker: bool = False,
    ) -> "TextToImage":
        """Load a diffusers checkpoint directory (or cached Hub id).

        `scheduler` optionally names a scheduler to use instead of the checkpoint's own, built from
        the checkpoint's scheduler config (an alias such as "unipc" or a class name such as
        "EulerDiscreteScheduler"). `variant` loads the repo's variant weight files (e.g. "fp16":
        half the download and load time where the repo ships them). See `apply_pipeline_settings`.
        `safety_checker`: keep the checkpoint's safety checker (SD 1.5 ships one). Off by default: it
        turns every image it flags into a black one, which would then be critiqued, scored and paired.
        """
        from pathlib import Path

        from diffusers import DiffusionPipeline

        from .families import detect_checkpoint_family

        if (Path(path) / "model_index.json").exists():  # an unknown pipeline fails before its weights load
            detect_checkpoint_family(path)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        extra = {"variant": variant} if variant else {}
        if not safety_checker:
            extra.update(without_safety_checker(str(path)))
        quiet_loading()
        pipe = DiffusionPipeline.from_pretrained(str(path), **diffusers_dtype_kwargs(dt), **extra)
        pipe = pipe.to(dev)
        apply_pipeline_settings(pipe, scheduler=scheduler, compile=compile, channels_last=channels_last)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, str(path), dev, dt)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        batch_size: int = 4,
        negative_prompt: str | None = None,
        max_sequence_length: int | None = None,
    ) -> list[Image.Image]:
        """One RGB image of `width`×`height` per (prompt, seed), in input order; sides are rounded to
        the nearest size the pipeline takes (`families.size_multiple`). `max_sequence_length`: prompt
        tokens of the T5 / Qwen2.5-VL encoders (flow-matching families; None: the pipeline's default)."""
        from .families import call_kwargs, round_size, size_multiple

        if self.pipe is None:
            raise RuntimeError("TextToImage is closed")
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        multiple = size_multiple(self.family, getattr(self.pipe, "vae_scale_factor", 8))
        h, w = round_size(height, multiple), round_size(width, multiple)
        if (h, w) != (height, width) and not getattr(self, "_warned_size", False):
            self._warned_size = True
            log.warning("%s takes sides in multiples of %d: generating %dx%d instead of %dx%d", self.model_id,
                        multiple, w, h, width, height)
        images: list[Image.Image] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            gens = cpu_generators(list(seeds[start : start + batch_size]))
            out = self.pipe(
                prompt=chunk,
                num_inference_steps=steps,
                height=h,
                width=w,
                generator=gens,
                output_type="pil",
                **call_kwargs(self.family, guidance_scale=guidance_scale, n=len(chunk),
                              negative_prompt=negative_prompt, max_sequence_length=max_sequence_length),
            )
            images.extend(im.convert("RGB") for im in out.images)
        return images

    def close(self) -> None:
        """Free the pipeline; the object cannot generate afterwards."""
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            release_pipeline(pipe)
