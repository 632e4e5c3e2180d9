"""FLUX.1 Kontext (black-forest-labs/FLUX.1-Kontext-dev: FLUX.1 [dev] non-commercial licence).

A 12B flow-matching transformer that reads the original image's latents as context tokens beside
the noise; `guidance_scale` is the distilled guidance fed to the model (2.5 in the model card), not
classifier-free guidance, so one forward pass per step. `edit.resolution: native` works at the
Kontext resolution (the pipeline's PREFERRED_KONTEXT_RESOLUTIONS, about 1024²) nearest the input's
aspect ratio, as the pipeline itself picks them, scaled down to `max_area` pixels where that is
smaller; sides multiples of 16 (x8 VAE, 2x2 patches). The image is resized here, so the pipeline's
own resize is off.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from .common import PipelineEditor, Resolution, Size, resolution_size, tokenizer_limits


class FluxKontextEditor(PipelineEditor):
    kind = "flux_kontext"
    SETTINGS = ("guidance_scale", "steps", "max_area", "resolution")

    @classmethod
    def pipeline_class(cls, model_path: str) -> Any:
        from diffusers import FluxKontextPipeline

        return FluxKontextPipeline

    def working_size(self, size: Size, *, max_area: int, resolution: Resolution = "native", **settings: Any) -> Size:
        multiple = int(getattr(self.pipe, "vae_scale_factor", 8)) * 2
        if resolution != "native":
            return resolution_size(size, resolution, max_area, multiple)
        return kontext_size(size, max_area, multiple)

    def text_limits(self) -> list:
        # T5 reads the prompt (max_sequence_length 512); CLIP only gives the pooled vector, cut at 77 by design.
        return tokenizer_limits(self.pipe, ("tokenizer_2",), limit=512)

    def run_batch(self, images: list[Image.Image], prompts: list[str], generators: list, size: Size, *,
                  guidance_scale: float, steps: int, max_area: int) -> list[Image.Image]:
        w, h = size
        # max_area = w * h: the pipeline derives the output size from it and the aspect ratio of
        # height/width, which gives back exactly (w, h).
        return self.pipe(image=images, prompt=prompts, height=h, width=w, max_area=w * h,
                         num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                         output_type="pil", _auto_resize=False).images


def kontext_size(size: Size, max_area: int, multiple: int) -> Size:
    """The preferred Kontext resolution nearest `size`'s aspect ratio (FluxKontextPipeline's choice
    when it resizes), brought down to about `max_area` pixels when over it, as the pipeline brings
    an output size to its `max_area` (sides rounded, then floored to `multiple`)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    ratio = size[0] / size[1]
    _, w, h = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    if w * h > max_area * 1.01:  # the preferred set spreads about 1% around 1024²
        r = w / h
        w, h = round((max_area * r) ** 0.5), round((max_area / r) ** 0.5)
    return max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)
