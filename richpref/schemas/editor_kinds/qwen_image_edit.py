"""Qwen-Image-Edit (richpref/models/editors/qwen_image_edit.py)."""
from . import EditorDecl, TinyTwin

KINDS = (EditorDecl("qwen_image_edit", "qwen_image_edit:QwenImageEditor", {
    "model": "Qwen/Qwen-Image-Edit", "guidance_scale": 4.0, "steps": 50, "max_area": 1024 * 1024,
    "negative_prompt": " ",
}, tiny=(TinyTwin("qwen_image_edit", folder="qwen-image-edit", build="editors:build_tiny_qwen_image_edit",
                  seed=70),)),)
