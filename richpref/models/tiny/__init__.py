"""The tiny profile's models: random weights, real architectures, built locally with a fixed seed.

`build_tiny_models(root)` writes each model with `save_pretrained` (the ONNX cutout net as a file under
the rembg home) so the tiny profile loads them through exactly the code that loads real checkpoints.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ...schemas.editor_kinds import EDITOR_KINDS
from ...schemas.plugins import TinyTwin
from ...schemas.rewards import REWARD_KINDS

log = logging.getLogger("richpref")

# Bump when any builder changes what it writes: a models dir built by another version is rebuilt.
TINY_VERSION = "6"
LAYOUT = {
    "sd15": "sd15",
    "controlnet": "controlnet-canny",
    "sdxl": "sdxl",
    "controlnet_sdxl": "controlnet-sdxl",
    "critic": "llava-critic",
    "vlm": "qwen2.5-vl",
    "edit_score_lora": "editscore-lora",  # a LoRA on the tiny Qwen2.5-VL, laid out like EditScore's (judges.py)
    "clip": "clip",
    "pickscore": "pickscore",
    "rembg_home": "rembg",
    # Flow-matching text-to-image pipelines (models/tiny/flow.py).
    "sd3": "sd3",
    "flux": "flux",
    "qwen_image": "qwen-image",
}
# Reward models in their original checkpoint layouts and the instruction editors: each kind's declared
# twins (richpref/schemas/rewards/, richpref/schemas/editor_kinds/; builders in models/tiny/rewards.py,
# head_judges.py, editors.py).
REWARD_TWINS = {t.key: t for t in (d.tiny for d in REWARD_KINDS.values()) if t is not None and t.build}
EDITOR_TWINS = {t.key: t for d in EDITOR_KINDS.values() for t in d.tiny if t.build}
LAYOUT.update({key: t.path for key, t in (REWARD_TWINS | EDITOR_TWINS).items()})


def build_twins(root, twins: dict[str, TinyTwin], seed: int = 0) -> dict[str, str]:
    """Each declared twin under `root` (the models it needs built first), seeded `seed` + its own offset."""
    import importlib

    root = Path(root)
    for t in twins.values():
        module, name = t.build.split(":")
        build = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        build(root / t.path, *(root / LAYOUT[n] for n in t.needs), *t.args, seed=seed + t.seed)
    return {key: str(root / t.path) for key, t in twins.items()}


def build_tiny_models(root, seed: int = 0, force: bool = False) -> dict[str, str]:
    """Build every tiny model under `root` (skipped when an up-to-date build is there)."""
    from .clip import build_tiny_clip
    from .diffusion import build_tiny_controlnet, build_tiny_sd15, build_tiny_sdxl, build_tiny_sdxl_controlnet
    from .flow import build_tiny_flow
    from .rembg import build_tiny_u2net_onnx
    from .vlm import build_tiny_llava_onevision, build_tiny_qwen2_5_vl

    root = Path(root)
    stamp = root / "BUILD.json"
    want = {"version": TINY_VERSION, "seed": seed}
    paths = {k: str(root / v) for k, v in LAYOUT.items()}
    # A build from before a model was added to LAYOUT lacks its folder: rebuild then too.
    complete = all(Path(p).exists() for p in paths.values())
    if not force and complete and stamp.exists() and json.loads(stamp.read_text()) == want:
        return paths
    root.mkdir(parents=True, exist_ok=True)
    build_tiny_sd15(root / LAYOUT["sd15"], seed=seed)
    build_tiny_controlnet(root / LAYOUT["sd15"], root / LAYOUT["controlnet"], seed=seed + 1)
    build_tiny_sdxl(root / LAYOUT["sdxl"], seed=seed + 7)
    build_tiny_sdxl_controlnet(root / LAYOUT["sdxl"], root / LAYOUT["controlnet_sdxl"], seed=seed + 8)
    build_tiny_llava_onevision(root / LAYOUT["critic"], seed=seed + 2)
    build_tiny_qwen2_5_vl(root / LAYOUT["vlm"], seed=seed + 3)
    from .judges import build_tiny_lora

    build_tiny_lora(root / LAYOUT["vlm"], root / LAYOUT["edit_score_lora"], seed=seed + 9)
    build_tiny_clip(root / LAYOUT["clip"], seed=seed + 4)
    build_tiny_clip(root / LAYOUT["pickscore"], seed=seed + 5)
    build_tiny_u2net_onnx(root / LAYOUT["rembg_home"], seed=seed + 6)
    build_twins(root, REWARD_TWINS, seed=seed)
    build_twins(root, EDITOR_TWINS, seed=seed)
    build_tiny_flow(root, seed=seed + 60)
    stamp.write_text(json.dumps(want))
    log.info("tiny models built under %s", root)
    return paths
