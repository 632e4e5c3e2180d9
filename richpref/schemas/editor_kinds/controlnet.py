"""ControlNet img2img (richpref/models/editors/controlnet.py): SD 1.5 / SDXL with a control image."""
from . import EditorDecl, TinyTwin

KINDS = (EditorDecl("controlnet_img2img", "controlnet:ControlNetEditor", {
    "model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "controlnet": "lllyasviel/control_v11p_sd15_canny",
    "control": "canny", "control_weights": None, "strength": 0.75, "guidance_scale": 7.5,
    "conditioning_scale": 1.0, "steps": 20,
}, tiny=(TinyTwin("controlnet"), TinyTwin("controlnet_sdxl"))),)
