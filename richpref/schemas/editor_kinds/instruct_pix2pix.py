"""InstructPix2Pix (richpref/models/editors/instruct_pix2pix.py), SD 1.5 and SDXL."""
from . import EditorDecl, TinyTwin

KINDS = (EditorDecl("instruct_pix2pix", "instruct_pix2pix:InstructPix2PixEditor", {
    "model": "timbrooks/instruct-pix2pix", "guidance_scale": 7.5, "image_guidance_scale": 1.5, "steps": 20,
}, tiny=(TinyTwin("instruct_pix2pix", folder="instruct-pix2pix", build="editors:build_tiny_instruct_pix2pix", seed=40),
         TinyTwin("instruct_pix2pix_sdxl", folder="instruct-pix2pix-sdxl",
                  build="editors:build_tiny_instruct_pix2pix_sdxl", seed=50))),)
