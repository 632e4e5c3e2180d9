"""InstructPix2Pix (SD 1.5: timbrooks/instruct-pix2pix; SDXL: diffusers/sdxl-instructpix2pix-768).

The UNet reads the original's latents beside the noise and follows the instruction text; two
guidance scales: `guidance_scale` (text) and `image_guidance_scale` (how close to the original;
1.5 in the paper). The pipeline class follows the checkpoint (SDXL bases get the XL variant).
Works at `edit.resolution`: natively at the checkpoint's training side (SD 1.5: 512; the SDXL
diffusers/sdxl-instructpix2pix-768: 768) as an area with the input's aspect, sides multiples of the
VAE factor.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from .common import PipelineEditor, Resolution, Size, is_sdxl, resolution_size, unet_native_side


class InstructPix2PixEditor(PipelineEditor):
    kind = "instruct_pix2pix"
    SETTINGS = ("guidance_scale", "image_guidance_scale", "steps", "resolution")

    @classmethod
    def pipeline_class(cls, model_path: str) -> Any:
        from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionXLInstructPix2PixPipeline

        return StableDiffusionXLInstructPix2PixPipeline if is_sdxl(model_path) else StableDiffusionInstructPix2PixPipeline

    @classmethod
    def pipeline_kwargs(cls, model_path: str) -> dict[str, Any]:
        if is_sdxl(model_path):
            return {}
        # Edits are filtered downstream; the NSFW checker would only blank images here.
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def working_size(self, size: Size, *, resolution: Resolution = "native", **settings: Any) -> Size:
        side = unet_native_side(self.pipe, self.model_id)
        return resolution_size(size, resolution, side * side, int(getattr(self.pipe, "vae_scale_factor", 8)))

    def run_batch(self, images: list[Image.Image], prompts: list[str], generators: list, size: Size, *,
                  guidance_scale: float, image_guidance_scale: float, steps: int) -> list[Image.Image]:
        extra = {"height": size[1], "width": size[0]} if is_sdxl_pipe(self.pipe) else {}
        return self.pipe(prompt=prompts, image=images, num_inference_steps=steps, guidance_scale=guidance_scale,
                         image_guidance_scale=image_guidance_scale, generator=generators, output_type="pil",
                         **extra).images


def is_sdxl_pipe(pipe: Any) -> bool:
    return "XL" in type(pipe).__name__
