"""HPSv2 / HPSv2.1 (xswu/HPSv2) on open_clip, loading the original `HPS_v2*_compressed.pt`.

The release is `{'state_dict': …}` of an open_clip ViT-H-14. Score, as `hpsv2.score`: open_clip's
tokenizer (77 ids), the HPS validation transform (`preprocess.hps_pixels`: tensor resize of the longest
side to 224, zero pad, OpenAI mean/std; no antialiasing — see there), then the dot product of the
L2-normalised image and text features. No `logit_scale`.

The architecture is open_clip's `ViT-H-14` config unless an `open_clip_config.json` (open_clip's own
Hub format: `{"model_cfg": …}`) sits beside the checkpoint, as it does for the tiny model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..runtime import resolve_device, resolve_dtype
from .base import RewardLoadError, batches, check_lengths, checkpoint_file, load_state_dict, load_strict
from .preprocess import hps_pixels

FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}  # not comparable with each other
ARCH = "ViT-H-14"


def open_clip_model_config(checkpoint: str, arch: str = ARCH) -> dict:
    side = Path(checkpoint).with_name("open_clip_config.json")
    if side.is_file():
        data = json.loads(side.read_text(encoding="utf-8"))
        return data.get("model_cfg", data)
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise RewardLoadError(f"open_clip has no model config {arch!r}")
    return cfg


class HPSv2:
    def __init__(self, path: str, *, file: str | None = None, version: str = "v2.0", antialias: bool = False,
                 device: str = "auto", dtype: str = "auto") -> None:
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        self.model_id = path
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.antialias = antialias
        if version not in FILES:
            raise RewardLoadError(f"HPS {path}: unknown version {version!r}; one of {', '.join(FILES)}")
        self.version = version
        ckpt = checkpoint_file(path, file or FILES[version])
        cfg = open_clip_model_config(ckpt)
        if cfg.get("custom_text") or "hf_model_name" in cfg.get("text_cfg", {}):
            raise RewardLoadError(f"HPS {path}: expected a plain open_clip CLIP config, got {cfg}")
        model = open_clip.CLIP(**{k: v for k, v in cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")})
        sd = load_state_dict(ckpt)
        load_strict(model, sd, f"HPS {path}")
        self.model = model.to(self.device, self.dtype).eval()
        self.image_size = cfg["vision_cfg"]["image_size"]
        self.tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))

    @torch.inference_mode()
    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        check_lengths(images, prompts)
        out = []
        for sl in batches(len(images), batch_size):
            pix = hps_pixels(images[sl], self.image_size, antialias=self.antialias).to(self.device, self.dtype)
            ids = self.tokenizer(list(prompts[sl])).to(self.device)
            img = self.model.encode_image(pix, normalize=True)
            txt = self.model.encode_text(ids, normalize=True)
            out.append((img * txt).sum(-1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def close(self) -> None:
        self.model = None
