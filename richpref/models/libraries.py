"""The model libraries the stages' loaders import, lazily, at a process's first model load.

One list for the two places that pay those imports ahead: a local CPU cluster's workers are forked
from a process that imported them (richpref/run/early_cluster.py), and the doctor times them, with
the accelerator's start, as the process start before the first model stage (models/runtime.start_process).
Importing this module imports none of them.
"""
from __future__ import annotations

import importlib

MODEL_LIBRARIES = ("transformers", "diffusers", "diffusers.models", "diffusers.pipelines.stable_diffusion",
                   "diffusers.pipelines.controlnet", "transformers.models.llava", "transformers.models.qwen2_5_vl",
                   "transformers.models.clip", "open_clip", "accelerate", "peft", "richpref.models.rembg_import",
                   # richpref's loaders, and what they import at module level (an editor's annotators)
                   "richpref.models.generator", "richpref.models.vlm", "richpref.models.editor",
                   "richpref.models.cutout", "richpref.models.rewards")


def import_model_libraries() -> None:
    """Import every model library this environment has; a missing one is left to the stage whose
    loader needs it, which names the package to install."""
    for name in MODEL_LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
