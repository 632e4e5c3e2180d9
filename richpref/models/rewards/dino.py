"""DINOv2 patch consistency (UPER §3.1.3): how much of the original an edit keeps, patch by patch.

Both images (the edit resized to the original's size) are cut into `patch`×`patch` windows with
stride `stride` (224 and 112 in the paper): windows start at 0, stride, 2·stride, … while they fit,
plus one flush with the far edge when the grid stops short of it (on 512 px: 0, 112, 224 and 288),
so every pixel is compared. Each window is embedded by DINOv2 at its native resolution
(ImageNet mean/std, no resize; the embedding is the final-LayerNorm CLS token, `pooler_output`), and
the score is the mean over windows of the cosine between spatially corresponding windows.

An image smaller than one window is first upscaled (bicubic) so its short side is one window.

It measures how much an edit kept of its original, not which of the two is better, so richpref uses
it as a gate (`score.subject_gate`, `relabel.min_consistency`), never as a vote: `score_pairs` gives the edit's side the
consistency and the original's side 1 (an image is fully consistent with itself).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..runtime import resolve_device, resolve_dtype
from .base import batches
from .preprocess import IMAGENET_MEAN, IMAGENET_STD


def window_starts(length: int, patch: int, stride: int) -> list[int]:
    """Starts of the windows along one side: every stride while a window fits, then one flush with the end."""
    starts = list(range(0, length - patch + 1, stride))
    if starts and starts[-1] + patch < length:
        starts.append(length - patch)
    return starts


def to_patch_grid(image: Image.Image, patch: int) -> Image.Image:
    w, h = image.size
    if min(w, h) >= patch:
        return image
    s = patch / min(w, h)
    return image.resize((max(patch, round(w * s)), max(patch, round(h * s))), Image.BICUBIC)


def extract_windows(image: Image.Image, patch: int, stride: int) -> np.ndarray:
    """(n_windows, patch, patch, 3) uint8, row-major over (top, left)."""
    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    return np.stack([arr[t:t + patch, l:l + patch] for t in window_starts(h, patch, stride)
                     for l in window_starts(w, patch, stride)])


class DinoPatchConsistency:
    pairwise = True

    def __init__(self, path: str, *, patch: int = 224, stride: int = 112, device: str = "auto", dtype: str = "auto") -> None:
        from transformers import AutoImageProcessor, Dinov2Model

        if patch < 1 or stride < 1:
            raise ValueError(f"DINOv2 patch consistency needs patch >= 1 and stride >= 1, got {patch}, {stride}")
        self.model_id = path
        self.patch, self.stride = patch, stride
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = Dinov2Model.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        try:
            proc = AutoImageProcessor.from_pretrained(path)
            mean, std = proc.image_mean, proc.image_std
        except (OSError, ValueError):  # a model dir without a preprocessor config: DINOv2's own ImageNet statistics
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def pair_windows(self, original: Image.Image, edit: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        original = to_patch_grid(original.convert("RGB"), self.patch)
        if edit.size != original.size:
            edit = edit.convert("RGB").resize(original.size, Image.BICUBIC)
        return extract_windows(original, self.patch, self.stride), extract_windows(edit, self.patch, self.stride)

    def embed(self, windows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(windows).permute(0, 3, 1, 2).float() / 255.0
        x = ((x - self.mean) / self.std).to(self.device, self.dtype)
        return self.model(pixel_values=x).pooler_output.float()

    @torch.inference_mode()
    def score_pairs(self, originals, edits, prompts=None, *, batch_size: int = 8) -> np.ndarray:
        if len(originals) != len(edits):
            raise ValueError(f"{len(originals)} originals but {len(edits)} edits")
        out = np.ones((len(originals), 2), dtype=np.float64)
        for sl in batches(len(originals), batch_size):
            pairs = [self.pair_windows(a, b) for a, b in zip(originals[sl], edits[sl])]
            counts = [len(a) for a, _ in pairs]
            emb_a = self.embed(np.concatenate([a for a, _ in pairs]))
            emb_b = self.embed(np.concatenate([b for _, b in pairs]))
            cos = torch.nn.functional.cosine_similarity(emb_a, emb_b, dim=-1).cpu().numpy()
            bounds = np.cumsum([0] + counts)
            for j, k in enumerate(range(sl.start, sl.stop)):
                out[k, 1] = float(cos[bounds[j]:bounds[j + 1]].mean())
        return out

    def close(self) -> None:
        self.model = None
