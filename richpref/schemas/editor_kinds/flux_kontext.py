"""FLUX.1 Kontext (richpref/models/editors/flux_kontext.py)."""
from . import EditorDecl, TinyTwin

KINDS = (EditorDecl("flux_kontext", "flux_kontext:FluxKontextEditor", {
    "model": "black-forest-labs/FLUX.1-Kontext-dev", "guidance_scale": 2.5, "steps": 28, "max_area": 1024 * 1024,
}, tiny=(TinyTwin("flux_kontext", folder="flux-kontext", build="editors:build_tiny_flux_kontext", seed=60),)),)
