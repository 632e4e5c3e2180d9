"""FLUX.1 Kontext (black-forest-labs/FLUX.1-Kontext-dev: FLUX.1 [dev] non-commercial licence).

A 12B flow-matching transformer that reads the original image's latents as context tokens beside
the noise; `guidance_scale` is the distilled guidance fed to the model (2.5 in the model card), not
classifier-free guidance, so one forward pass per step. Works at about `max_area` pixels (Kontext is
trained around 1024²) with the input's aspect ratio, sides multiples of 16 (×8 VAE, 2×2 patches);
the image is resized here, so the pipeline's own resize to its preferred sizes is off.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from .common import PipelineEditor, Size, area_size


class FluxKontextEditor(PipelineEditor):
    kind = "flux_kontext"
    SETTINGS = ("guidance_scale", "steps", "max_area")

    @classmethod
    def pipeline_class(cls, model_path: str) -> Any:
        from diffusers import FluxKontextPipeline

        return FluxKontextPipeline

    def working_size(self, size: Size, *, max_area: int, **settings: Any) -> Size:
        return area_size(size, max_area, int(getattr(self.pipe, "vae_scale_factor", 8)) * 2)

    def run_batch(self, images: list[Image.Image], prompts: list[str], generators: list, size: Size, *,
                  guidance_scale: float, steps: int, max_area: int) -> list[Image.Image]:
        w, h = size
        # max_area = w * h: the pipeline derives the output size from it and the aspect ratio of
        # height/width, which gives back exactly (w, h).
        return self.pipe(image=images, prompt=prompts, height=h, width=w, max_area=w * h,
                         num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                         output_type="pil", _auto_resize=False).images
