"""Qwen-Image-Edit (Qwen/Qwen-Image-Edit, Apache-2.0).

A 20B MMDiT conditioned on Qwen2.5-VL, which sees the original image and the instruction, and on the
original's VAE latents; real classifier-free guidance (`guidance_scale`, diffusers' `true_cfg_scale`:
4.0 in the model card) against `negative_prompt`, so two forward passes per step. `edit.resolution:
native` works at about `max_area` pixels with the input's aspect ratio, sides rounded to the nearest
multiple of 32 exactly as the pipeline's `calculate_dimensions` sizes the conditioning image, so the
output and the conditioning have one size (16:9 at 1024²: 1376x768, not 1344x768).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

from PIL import Image

from .common import PipelineEditor, Resolution, Size, resolution_size, round_area_size, tokenizer_limits

PIPELINE_AREA = 1024 * 1024  # the conditioning area QwenImageEditPipeline resizes every input to
_AREA_LOCK = threading.Lock()


@contextmanager
def conditioning_area(area: int) -> Iterator[None]:
    """Make QwenImageEditPipeline resize the original to about `area` pixels instead of its fixed 1024².

    The pipeline has no argument for it: it calls its module's `calculate_dimensions(1024 * 1024,
    ratio)`. At the default area nothing is changed; otherwise that function is swapped for the
    call (under a lock, so concurrent calls cannot see each other's area).
    """
    if area == PIPELINE_AREA:
        yield
        return
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    with _AREA_LOCK:
        original = module.calculate_dimensions
        module.calculate_dimensions = lambda _area, ratio: original(area, ratio)
        try:
            yield
        finally:
            module.calculate_dimensions = original


class QwenImageEditor(PipelineEditor):
    kind = "qwen_image_edit"
    SETTINGS = ("guidance_scale", "steps", "max_area", "negative_prompt", "resolution")

    @classmethod
    def pipeline_class(cls, model_path: str) -> Any:
        from diffusers import QwenImageEditPipeline

        return QwenImageEditPipeline

    def working_size(self, size: Size, *, max_area: int, resolution: Resolution = "native", **settings: Any) -> Size:
        if resolution == "native":
            return round_area_size(size, max_area, 32)  # = calculate_dimensions(max_area, ratio)
        return resolution_size(size, resolution, max_area, 32)

    def text_limits(self) -> list:
        # Qwen2.5-VL reads the instruction; the pipeline keeps max_sequence_length = 512 of its tokens.
        return tokenizer_limits(self.pipe, ("tokenizer",), limit=512)

    def run_batch(self, images: list[Image.Image], prompts: list[str], generators: list, size: Size, *,
                  guidance_scale: float, steps: int, max_area: int, negative_prompt: str) -> list[Image.Image]:
        w, h = size
        # The conditioning image at the working size itself: calculate_dimensions(w * h, w / h) = (w, h)
        # for sides that are multiples of 32.
        with conditioning_area(w * h):
            return self.pipe(image=images, prompt=prompts, negative_prompt=[negative_prompt] * len(prompts),
                             true_cfg_scale=guidance_scale, height=h, width=w, num_inference_steps=steps,
                             generator=generators, output_type="pil").images
