"""ControlNet img2img editing (SD 1.5 or SDXL): `edit.kind: controlnet_img2img`, RPO's editor.

The original image is both the img2img starting point and the source of the control image (its canny
edges, soft edges from HED or PiDiNet, line art, or itself for a "tile" ControlNet), so an edit keeps
the layout and changes what the prompt asks for. As in `generator`, every item has its own CPU
generator: an edit depends only on (image, prompt, seed, settings), not on the batch it ran in.
Network annotators (HED, PiDiNet, line art) load their weights from a path; see `ControlDetector`.
"""
from __future__ import annotations

import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..generator import cpu_generators, diffusers_dtype_kwargs, quiet_loading, release_pipeline
from ..runtime import ModelNotAvailable, resolve_device, resolve_dtype
from .common import Resolution, count_tokens, resolution_size, tokenizer_limits, unet_native_side
from .common import is_sdxl as _is_sdxl

CONTROL_KINDS = ("canny", "tile", "lineart_standard", "softedge_hed", "softedge_pidi", "lineart")
# Control kinds computed by a network, and the weights file each loads, named as in lllyasviel/Annotators
# (the annotator repository the ControlNet 1.1 models were trained with).
ANNOTATOR_FILES = {
    "softedge_hed": "ControlNetHED.pth",
    "softedge_pidi": "table5_pidinet.pth",
    "lineart": "sk_model.pth",
}


def _detect_resolution(image: Image.Image, resolution: int | None) -> int:
    # controlnet_aux rounds the working size to multiples of 64; below 64 it would round to zero.
    return max(64, int(resolution) if resolution else min(image.size))


def _import_aux(kind: str) -> Any:
    """Import the one controlnet_aux module `kind` needs, on first use.

    Any `controlnet_aux.<module>` import runs the package __init__, which imports every detector
    (timm, SAM, ...): it costs ~60 MB on top of an already-loaded torch/diffusers, so it stays out of
    module import time. Its import-time deprecation chatter is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "canny":
            from controlnet_aux import canny as module
        elif kind == "lineart_standard":
            from controlnet_aux import lineart_standard as module
        elif kind == "softedge_hed":
            from controlnet_aux import hed as module
        elif kind == "softedge_pidi":
            from controlnet_aux import pidi as module
        elif kind == "lineart":
            from controlnet_aux import lineart as module
        else:
            raise ValueError(f"unknown control kind {kind!r}; expected one of {CONTROL_KINDS}")
    return module


def annotator_network(kind: str) -> torch.nn.Module:
    """A freshly initialised (untrained) network of the annotator behind `kind`, in eval mode."""
    module = _import_aux(kind)
    if kind == "softedge_hed":
        net = module.ControlNetHED_Apache2()
    elif kind == "softedge_pidi":
        from controlnet_aux.pidi.model import pidinet

        net = pidinet()
    elif kind == "lineart":
        net = module.Generator(3, 1, 3)  # controlnet_aux's LineartDetector architecture
    else:
        raise ValueError(f"control kind {kind!r} has no network; networks exist for {sorted(ANNOTATOR_FILES)}")
    return net.float().eval()


def annotator_state_dict(kind: str, net: torch.nn.Module) -> dict[str, Any]:
    """`net`'s weights in the layout of the published annotator file (what `load_annotator_network` reads)."""
    state = net.state_dict()
    if kind == "softedge_pidi":  # published as a DataParallel training checkpoint
        return {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    return dict(state)


def load_annotator_network(kind: str, weights: str | os.PathLike) -> torch.nn.Module:
    """The annotator network for `kind` with the weights at `weights`: a directory in the
    lllyasviel/Annotators layout, or the weights file itself (.pth, read with weights_only=True, or
    .safetensors)."""
    if kind not in ANNOTATOR_FILES:
        raise ValueError(f"control kind {kind!r} has no network; networks exist for {sorted(ANNOTATOR_FILES)}")
    path = Path(weights).expanduser()
    if path.is_dir():
        path = path / ANNOTATOR_FILES[kind]
    if not path.is_file():
        raise ModelNotAvailable(
            f"annotator weights for control {kind!r} not found at {path}: download {ANNOTATOR_FILES[kind]} "
            "from lllyasviel/Annotators and point edit.control_weights at its directory or at the file."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: dict[str, Any] = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if kind == "softedge_pidi":
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
    net = annotator_network(kind)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not hold {kind!r} annotator weights ({ANNOTATOR_FILES[kind]}): {exc}") from exc
    return net.float().eval()


class ControlDetector:
    """Turns an image into its ControlNet conditioning image (RGB, the image's own size).

    kind: "canny" (thresholds 100/200), "lineart_standard" (no weights), "tile" (the image itself),
    or a network annotator: "softedge_hed", "softedge_pidi", "lineart" (give `network`, or use `load`).
    `resolution` is the short side, in pixels, detectors work at (default: the image's own).
    """

    def __init__(self, kind: str, network: torch.nn.Module | None = None, *, resolution: int | None = None) -> None:
        if kind not in CONTROL_KINDS:
            raise ValueError(f"unknown control kind {kind!r}; expected one of {CONTROL_KINDS}")
        if kind in ANNOTATOR_FILES and network is None:
            raise ValueError(
                f"control {kind!r} runs an annotator network: set edit.control_weights to a directory holding "
                f"{ANNOTATOR_FILES[kind]} (e.g. a download of lllyasviel/Annotators) or to that file"
            )
        self.kind = kind
        self.resolution = resolution
        self._detector: Any = None
        if kind == "canny":
            self._detector = _import_aux(kind).CannyDetector()
        elif kind == "lineart_standard":
            self._detector = _import_aux(kind).LineartStandardDetector()
        elif kind == "softedge_hed":
            self._detector = _import_aux(kind).HEDdetector(network)
        elif kind == "softedge_pidi":
            self._detector = _import_aux(kind).PidiNetDetector(network)
        elif kind == "lineart":
            # The coarse variant is never used here, so the fine network stands in for it.
            self._detector = _import_aux(kind).LineartDetector(network, network)

    @classmethod
    def load(
        cls, kind: str, weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
        resolution: int | None = None,
    ) -> "ControlDetector":
        """A detector for `kind`; network kinds load their weights from `weights` (ignored otherwise)."""
        if kind in ANNOTATOR_FILES and weights is not None:
            network = load_annotator_network(kind, weights).to(device)
            return cls(kind, network, resolution=resolution)
        return cls(kind, resolution=resolution)

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> Image.Image:
        rgb = image.convert("RGB")
        if self.kind == "tile":
            return rgb.copy()
        res = _detect_resolution(rgb, self.resolution)
        arr = np.asarray(rgb, dtype=np.uint8)
        if self.kind == "canny":
            detected = self._detector(
                arr, low_threshold=100, high_threshold=200, detect_resolution=res, image_resolution=res, output_type="np"
            )
        elif self.kind == "lineart_standard":
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                # An image with no dark strokes makes the detector take the median of an empty array
                # (numpy warns, the detector then falls back to its floor of 16): a blank map is right.
                warnings.simplefilter("ignore", RuntimeWarning)
                detected = self._detector(arr, detect_resolution=res, output_type="np")
        else:
            detected = self._detector(arr, detect_resolution=res, image_resolution=res, output_type="np")
        out = Image.fromarray(np.asarray(detected, dtype=np.uint8)).convert("RGB")
        # Detectors work on a grid of 64 px multiples; bring the map back onto the image's own pixels.
        if out.size != rgb.size:
            out = out.resize(rgb.size, Image.Resampling.BILINEAR)
        return out


def make_control_image(image: Image.Image, kind: str, *, resolution: int | None = None) -> Image.Image:
    """The ControlNet conditioning image for `image` with a weightless detector ("canny",
    "lineart_standard", "tile"); network annotators need a `ControlDetector` with weights."""
    return ControlDetector(kind, resolution=resolution)(image)


class ControlNetEditor:
    """A loaded ControlNet img2img pipeline: base checkpoint + one ControlNet."""

    kind = "controlnet_img2img"
    SETTINGS = ("strength", "guidance_scale", "conditioning_scale", "steps", "resolution")  # `control` is chosen at load

    def __init__(
        self, pipe: Any, model_id: str, device: torch.device, dtype: torch.dtype,
        detector: ControlDetector | None = None,
    ) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.detector = detector or ControlDetector("canny")

    @classmethod
    def load(
        cls, base_path: str, controlnet_path: str, *, device: str = "auto", dtype: str = "auto",
        control: str = "canny", control_weights: str | os.PathLike | None = None,
    ) -> "ControlNetEditor":
        """Load `base_path` (SD 1.5 or SDXL diffusers checkpoint) with the ControlNet at `controlnet_path`.

        The pipeline class follows the base: SDXL bases get StableDiffusionXLControlNetImg2ImgPipeline.
        `control` names the detector that makes control images (CONTROL_KINDS); network annotators
        load their weights from `control_weights` (see `load_annotator_network`) onto the same device.
        """
        from diffusers import (
            ControlNetModel,
            StableDiffusionControlNetImg2ImgPipeline,
            StableDiffusionXLControlNetImg2ImgPipeline,
        )

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        # The detector first: a missing annotator fails before gigabytes of pipeline are read.
        detector = ControlDetector.load(control, control_weights, device=dev)
        dtype_kw = diffusers_dtype_kwargs(dt)
        quiet_loading()
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
        return cls(pipe, f"{base_path}+{controlnet_path}", dev, dt, detector)

    @torch.inference_mode()
    def edit(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        control: str | ControlDetector | None = None,
        strength: float = 0.75,
        guidance_scale: float = 7.5,
        conditioning_scale: float = 1.0,
        steps: int = 20,
        batch_size: int = 4,
        resolution: Resolution = "native",
        output_size: str = "input",
    ) -> list[Image.Image]:
        """Edit each image toward its prompt at the working size `resolution` gives (`working_size`);
        returns RGB images in input order, of each input's size or (`output_size="working"`) the
        working size.

        `strength` is the img2img noise level (0 keeps the original, 1 ignores it); the ControlNet
        keeps the structure given by `control`: a ControlDetector, a weightless kind ("canny",
        "lineart_standard", "tile"), or None for the detector chosen at load time.
        """
        if self.pipe is None:
            raise RuntimeError("ControlNetEditor is closed")
        if not (len(images) == len(prompts) == len(seeds)):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts and {len(seeds)} seeds")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        detector = control if isinstance(control, ControlDetector) else (
            self.detector if control is None else ControlDetector(control)
        )
        if output_size not in ("input", "working"):
            raise ValueError(f"output_size {output_size!r}: expected input or working")

        # A batch needs one size: group items by working size, keeping input order inside each
        # group so results can be put back in place.
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(images):
            groups[self.working_size(im.size, resolution=resolution)].append(i)

        results: list[Image.Image | None] = [None] * len(images)
        for (w, h), idxs in groups.items():
            for start in range(0, len(idxs), batch_size):
                chunk = idxs[start : start + batch_size]
                init = [images[i].convert("RGB") for i in chunk]
                ctrl = [detector(im) for im in init]
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
                    target = images[i].size if output_size == "input" else (w, h)
                    if im.size != target:
                        im = im.resize(target, Image.Resampling.LANCZOS)
                    results[i] = im
        return results  # type: ignore[return-value]

    def working_size(self, size: tuple[int, int], *, resolution: Resolution = "native", **settings) -> tuple[int, int]:
        """The size `edit` works at for an input of `size` under `edit.resolution`: natively the base's
        training side squared (SD 1.5: 512², SDXL: 1024²) with the input's aspect ratio, sides
        multiples of the VAE factor; `keep`: the input's size snapped to it; N: about N x N."""
        side = unet_native_side(self.pipe, self.model_id.split("+")[0])
        return resolution_size(size, resolution, side * side, int(getattr(self.pipe, "vae_scale_factor", 8)))

    def count_tokens(self, text: str) -> list[tuple[str, int, int]]:
        """(tokenizer, tokens of `text`, tokens its CLIP encoder reads) for SD 1.5's one and SDXL's two."""
        return count_tokens(tokenizer_limits(self.pipe), text)

    def close(self) -> None:
        """Free the pipeline (and the detector's network); the object cannot edit afterwards."""
        self.detector = None  # type: ignore[assignment]
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            release_pipeline(pipe)
