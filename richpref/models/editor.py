"""Image editing with a ControlNet img2img pipeline (SD 1.5 or SDXL).

The original image is both the img2img starting point and the source of the control image (its canny
edges, line art, or itself for a "tile" ControlNet), so an edit keeps the layout and changes what the
prompt asks for. As in `generator`, every item has its own CPU generator: an edit depends only on
(image, prompt, seed, settings), not on the batch it ran in.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .generator import cpu_generators, diffusers_dtype_kwargs, release_pipeline
from .runtime import resolve_device, resolve_dtype

CONTROL_KINDS = ("canny", "tile", "lineart_standard")


def _detect_resolution(image: Image.Image, resolution: int | None) -> int:
    # controlnet_aux rounds the working size to multiples of 64; below 64 it would round to zero.
    return max(64, int(resolution) if resolution else min(image.size))


def _import_detector(name: str) -> Any:
    """Import one controlnet_aux detector class on first use.

    Any `controlnet_aux.<module>` import runs the package __init__, which imports every detector
    (timm, SAM, ...): it costs ~60 MB on top of an already-loaded torch/diffusers, so it stays out of
    module import time. Its import-time deprecation chatter is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "canny":
            from controlnet_aux.canny import CannyDetector

            return CannyDetector
        from controlnet_aux.lineart_standard import LineartStandardDetector

        return LineartStandardDetector


def make_control_image(image: Image.Image, kind: str, *, resolution: int | None = None) -> Image.Image:
    """The ControlNet conditioning image for `image`: RGB, same size as `image`.

    kind: "canny" (controlnet_aux CannyDetector, thresholds 100/200), "lineart_standard" (controlnet_aux
    LineartStandardDetector, no weights needed) or "tile" (the image itself). `resolution` is the short
    side, in pixels, the detector works at (default: the image's own short side).
    """
    if kind not in CONTROL_KINDS:
        raise ValueError(f"unknown control kind {kind!r}; expected one of {CONTROL_KINDS}")
    rgb = image.convert("RGB")
    if kind == "tile":
        return rgb.copy()
    res = _detect_resolution(rgb, resolution)
    arr = np.asarray(rgb, dtype=np.uint8)
    if kind == "canny":
        detected = _import_detector("canny")()(
            arr, low_threshold=100, high_threshold=200, detect_resolution=res, image_resolution=res, output_type="np"
        )
    else:  # lineart_standard
        detector = _import_detector("lineart_standard")()
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # An image with no dark strokes makes the detector take the median of an empty array
            # (numpy warns, the detector then falls back to its floor of 16): a blank map is right.
            warnings.simplefilter("ignore", RuntimeWarning)
            detected = detector(arr, detect_resolution=res, output_type="np")
    out = Image.fromarray(np.asarray(detected, dtype=np.uint8)).convert("RGB")
    # Detectors work on a grid of 64 px multiples; bring the map back onto the image's own pixels.
    if out.size != rgb.size:
        out = out.resize(rgb.size, Image.Resampling.BILINEAR)
    return out


def _is_sdxl(base_path: str) -> bool:
    """Whether the base checkpoint is SDXL, from its model_index.json (local dir or cached Hub id)."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(str(base_path))
    return "XL" in str(config.get("_class_name", ""))


def _snap(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Nearest size whose sides are multiples of `multiple` (the VAE factor), at least one multiple."""
    return tuple(max(multiple, int(round(s / multiple)) * multiple) for s in size)  # type: ignore[return-value]


class ControlNetEditor:
    """A loaded ControlNet img2img pipeline: base checkpoint + one ControlNet."""

    def __init__(self, pipe: Any, model_id: str, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.device = device
        self.dtype = dtype

    @classmethod
    def load(
        cls, base_path: str, controlnet_path: str, *, device: str = "auto", dtype: str = "auto"
    ) -> "ControlNetEditor":
        """Load `base_path` (SD 1.5 or SDXL diffusers checkpoint) with the ControlNet at `controlnet_path`.

        The pipeline class follows the base: SDXL bases get StableDiffusionXLControlNetImg2ImgPipeline.
        """
        from diffusers import (
            ControlNetModel,
            StableDiffusionControlNetImg2ImgPipeline,
            StableDiffusionXLControlNetImg2ImgPipeline,
        )

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        dtype_kw = diffusers_dtype_kwargs(dt)
        controlnet = ControlNetModel.from_pretrained(str(controlnet_path), **dtype_kw)
        if _is_sdxl(base_path):
            pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
                str(base_path), controlnet=controlnet, **dtype_kw
            )
        else:
            pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
                str(base_path),
                controlnet=controlnet,
                # Edits are filtered downstream; the NSFW checker would only blank images here.
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **dtype_kw,
            )
        pipe = pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, f"{base_path}+{controlnet_path}", dev, dt)

    @torch.inference_mode()
    def edit(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        control: str = "canny",
        strength: float = 0.75,
        guidance_scale: float = 7.5,
        conditioning_scale: float = 1.0,
        steps: int = 20,
        batch_size: int = 4,
    ) -> list[Image.Image]:
        """Edit each image toward its prompt; returns RGB images of each input's size, in input order.

        `strength` is the img2img noise level (0 keeps the original, 1 ignores it); the ControlNet
        keeps the structure given by `control` (one of CONTROL_KINDS).
        """
        if self.pipe is None:
            raise RuntimeError("ControlNetEditor is closed")
        if not (len(images) == len(prompts) == len(seeds)):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts and {len(seeds)} seeds")
        if control not in CONTROL_KINDS:
            raise ValueError(f"unknown control kind {control!r}; expected one of {CONTROL_KINDS}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        factor = int(getattr(self.pipe, "vae_scale_factor", 8))

        # A batch needs one size: group items by working size (input snapped to the VAE factor),
        # keeping input order inside each group so results can be put back in place.
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            groups[_snap(im.size, factor)].append(i)

        results: list[Image.Image | None] = [None] * len(images)
        for (w, h), idxs in groups.items():
            for start in range(0, len(idxs), batch_size):
                chunk = idxs[start : start + batch_size]
                init = [images[i].convert("RGB") for i in chunk]
                ctrl = [make_control_image(im, control) for im in init]
                if (w, h) != init[0].size:
                    init = [im.resize((w, h), Image.Resampling.LANCZOS) for im in init]
                    ctrl = [c.resize((w, h), Image.Resampling.BILINEAR) for c in ctrl]
                out = self.pipe(
                    prompt=[prompts[i] for i in chunk],
                    image=init,
                    control_image=ctrl,
                    height=h,
                    width=w,
                    strength=strength,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    controlnet_conditioning_scale=conditioning_scale,
                    generator=cpu_generators([seeds[i] for i in chunk]),
                    output_type="pil",
                )
                for i, im in zip(chunk, out.images):
                    im = im.convert("RGB")
                    if im.size != images[i].size:
                        im = im.resize(images[i].size, Image.Resampling.LANCZOS)
                    results[i] = im
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Free the pipeline; the object cannot edit afterwards."""
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            release_pipeline(pipe)
