"""What every editor shares: per-item seeds, batching by working size, loading and releasing.

An editor turns (image, edit prompt, seed) into an edited image. It works at the size
`edit.resolution` gives (by default the checkpoint's native one, aspect kept, sides multiples of what
the model accepts); items are grouped by that size (a batch needs one size), each item gets its own
CPU generator (an edit depends on its seed, not on its batch neighbours), and outputs come back at
the input's size or, as the edit stage asks, at the working size the model made them at.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from ..generator import cpu_generators, diffusers_dtype_kwargs, quiet_loading, release_pipeline
from ..runtime import resolve_device, resolve_dtype

Size = tuple[int, int]


def is_sdxl(model_path: str) -> bool:
    """Whether a diffusers checkpoint is an SDXL pipeline, from its model_index.json (local dir or cached Hub id)."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(str(model_path))
    return "XL" in str(config.get("_class_name", ""))


def snap(size: Size, multiple: int) -> Size:
    """Nearest size whose sides are multiples of `multiple` (the VAE factor), at least one multiple."""
    return tuple(max(multiple, int(round(s / multiple)) * multiple) for s in size)  # type: ignore[return-value]


def round_area_size(size: Size, area: int, multiple: int) -> Size:
    """The size of about `area` pixels with `size`'s aspect ratio, sides rounded to the nearest
    `multiple` (at least one multiple): how the diffusers pipelines pick a size for an area
    (QwenImageEditPipeline's `calculate_dimensions` with multiple 32)."""
    w, h = size
    width = (area * w / h) ** 0.5
    height = width * h / w
    return (max(multiple, round(width / multiple) * multiple), max(multiple, round(height / multiple) * multiple))


# `edit.resolution`: "native" (the checkpoint's own size, aspect kept), "keep" (the input's size,
# snapped to what the model accepts) or an int N (about N x N pixels, aspect kept).
Resolution = str | int


def resolution_size(size: Size, resolution: Resolution, native_area: int, multiple: int) -> Size:
    """The working size for an input of `size` under `resolution`, sides multiples of `multiple`."""
    if resolution == "keep":
        return snap(size, multiple)
    if resolution == "native":
        return round_area_size(size, native_area, multiple)
    if isinstance(resolution, int) and not isinstance(resolution, bool) and resolution > 0:
        return round_area_size(size, resolution * resolution, multiple)
    raise ValueError(f"edit.resolution {resolution!r}: expected native, keep or a side in pixels")


def tokenizer_limits(pipe: Any, attrs: Sequence[str] = ("tokenizer", "tokenizer_2"),
                     limit: int | None = None) -> list[tuple[str, Any, int]]:
    """(name, tokenizer, most tokens its encoder reads) for each of `pipe`'s tokenizers in `attrs`:
    the tokenizer's own model_max_length (CLIP: 77 with its start and end tokens), or `limit`."""
    out = []
    for attr in attrs:
        tok = getattr(pipe, attr, None)
        if tok is not None:
            out.append((f"{attr} ({type(tok).__name__})", tok, int(limit or tok.model_max_length)))
    return out


def count_tokens(limits: list[tuple[str, Any, int]], text: str) -> list[tuple[str, int, int]]:
    """(name, tokens of `text` with the special tokens its encoder sees, limit) per tokenizer."""
    return [(name, len(tok(text, add_special_tokens=True, verbose=False)["input_ids"]), lim)
            for name, tok, lim in limits]


def unet_native_side(pipe: Any, model_id: str) -> int:
    """The side a UNet checkpoint is trained at: its UNet's `sample_size` times the VAE factor (SD 1.5:
    64 x 8 = 512, SDXL: 128 x 8 = 1024), or the resolution a checkpoint's name states where its
    config keeps its base's (diffusers/sdxl-instructpix2pix-768: trained at 768, config of SDXL's 1024)."""
    name = str(model_id).rstrip("/")
    for side in (768, 512):
        if name.endswith(f"instructpix2pix-{side}"):
            return side
    sample = pipe.unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * int(getattr(pipe, "vae_scale_factor", 8))


def edit_in_batches(
    images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int], *, batch_size: int,
    size_for: Callable[[Size], Size], run: Callable[[list[Image.Image], list[str], list, Size], list[Image.Image]],
    output_size: str = "input",
) -> list[Image.Image]:
    """Edit every item, in batches of one working size; returns RGB images in input order, each of
    its input's size (`output_size="input"`) or of the working size the model made it at ("working").

    `size_for` maps an input size to the working size; `run(images, prompts, generators, size)` edits
    one batch of images already resized to `size`.
    """
    if output_size not in ("input", "working"):
        raise ValueError(f"output_size {output_size!r}: expected input or working")
    if not (len(images) == len(prompts) == len(seeds)):
        raise ValueError(f"got {len(images)} images, {len(prompts)} prompts and {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    groups: dict[Size, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        groups[size_for(im.size)].append(i)
    results: list[Image.Image | None] = [None] * len(images)
    for size, idxs in groups.items():
        for start in range(0, len(idxs), batch_size):
            chunk = idxs[start : start + batch_size]
            init = [images[i].convert("RGB") for i in chunk]
            init = [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in init]
            out = run(init, [prompts[i] for i in chunk], cpu_generators([seeds[i] for i in chunk]), size)
            for i, im in zip(chunk, out):
                im = im.convert("RGB")
                target = images[i].size if output_size == "input" else size
                results[i] = im if im.size == target else im.resize(target, Image.Resampling.LANCZOS)
    return results  # type: ignore[return-value]


class PipelineEditor:
    """A loaded diffusers editing pipeline. Subclasses name their `kind`, the `SETTINGS` their `edit`
    takes (the config fields of that kind passed at each call), the pipeline class, the working
    size and one batch's call."""

    kind: str = ""
    SETTINGS: tuple[str, ...] = ()

    def __init__(self, pipe: Any, model_id: str, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.device = device
        self.dtype = dtype

    @classmethod
    def pipeline_class(cls, model_path: str) -> Any:
        raise NotImplementedError

    @classmethod
    def pipeline_kwargs(cls, model_path: str) -> dict[str, Any]:
        return {}

    @classmethod
    def load(cls, model_path: str, *, device: str = "auto", dtype: str = "auto") -> "PipelineEditor":
        """Load the checkpoint at `model_path` (local dir or Hub id) onto `device` in `dtype`."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        quiet_loading()
        pipe = cls.pipeline_class(model_path).from_pretrained(
            str(model_path), **cls.pipeline_kwargs(model_path), **diffusers_dtype_kwargs(dt))
        pipe = pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, str(model_path), dev, dt)

    def working_size(self, size: Size, *, resolution: Resolution = "native", **settings: Any) -> Size:
        raise NotImplementedError

    def text_limits(self) -> list[tuple[str, Any, int]]:
        """The tokenizers whose encoders read the edit prompt, with how many tokens each reads."""
        return tokenizer_limits(self.pipe)

    def count_tokens(self, text: str) -> list[tuple[str, int, int]]:
        return count_tokens(self.text_limits(), text)

    def run_batch(self, images: list[Image.Image], prompts: list[str], generators: list, size: Size,
                  **settings: Any) -> list[Image.Image]:
        raise NotImplementedError

    @torch.inference_mode()
    def edit(self, images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int], *,
             batch_size: int = 4, output_size: str = "input", **settings: Any) -> list[Image.Image]:
        """Edit each image as its prompt says, at the working size `resolution` gives; RGB images in
        input order, of each input's size or (`output_size="working"`) the working size."""
        if self.pipe is None:
            raise RuntimeError(f"{type(self).__name__} is closed")
        unknown = sorted(set(settings) - set(self.SETTINGS))
        if unknown:
            raise TypeError(f"{self.kind} editor takes no {', '.join(unknown)}; it takes {', '.join(self.SETTINGS)}")
        resolution = settings.pop("resolution", "native")
        return edit_in_batches(
            images, prompts, seeds, batch_size=batch_size, output_size=output_size,
            size_for=lambda s: self.working_size(s, resolution=resolution, **settings),
            run=lambda ims, ps, gens, size: self.run_batch(ims, ps, gens, size, **settings))

    def close(self) -> None:
        """Free the pipeline; the object cannot edit afterwards."""
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            release_pipeline(pipe)
