"""Reward models behind one interface: `score(images, prompts) -> np.ndarray` (higher is better).

Each scorer loads a real checkpoint (Hub id or local dir) with the same code the tiny profile runs.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from .runtime import resolve_device, resolve_dtype


class Reward(Protocol):
    model_id: str

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], *, batch_size: int = 8) -> np.ndarray: ...


class CLIPSimilarity:
    """Cosine similarity of CLIP image and text embeddings; `scaled=True` multiplies by the model's
    learned `logit_scale.exp()`, which is PickScore's definition (yuvalkirstain/PickScore_v1)."""

    def __init__(self, path: str, *, scaled: bool, device: str = "auto", dtype: str = "auto") -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.device = resolve_device(device)
        self.model_id = path
        self.scaled = scaled
        # The reference scorers preprocess with PIL; keep that backend so scores match theirs.
        self.processor = CLIPProcessor.from_pretrained(path, backend="pil")
        self.model = CLIPModel.from_pretrained(path, dtype=resolve_dtype(dtype, self.device)).to(self.device).eval()

    @torch.inference_mode()
    def score(self, images, prompts, *, batch_size: int = 8) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            imgs = [im.convert("RGB") for im in images[i : i + batch_size]]
            texts = list(prompts[i : i + batch_size])
            pix = self.processor(images=imgs, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
            tok = self.processor(text=texts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
            img_emb = self.model.get_image_features(pixel_values=pix).pooler_output
            txt_emb = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                   attention_mask=tok["attention_mask"].to(self.device)).pooler_output
            img_emb = img_emb / img_emb.norm(dim=-1, keepdim=True)
            txt_emb = txt_emb / txt_emb.norm(dim=-1, keepdim=True)
            cos = (img_emb * txt_emb).sum(-1).float()
            if self.scaled:
                cos = self.model.logit_scale.exp().float() * cos
            out.append(cos.cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def close(self) -> None:
        self.model = None


def load_reward(kind: str, path: str, *, device: str = "auto", dtype: str = "auto") -> Reward:
    if kind == "clip":
        return CLIPSimilarity(path, scaled=False, device=device, dtype=dtype)
    if kind == "pickscore":
        return CLIPSimilarity(path, scaled=True, device=device, dtype=dtype)
    raise ValueError(f"unknown reward kind {kind!r}; known: clip, pickscore")


def zscore(values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Standardise within each group: (x - mean) / std (population std); a group with no spread is 0."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.zeros(len(values), dtype=np.int64) if groups is None else np.asarray(groups)
    z = np.zeros_like(values)
    for g in np.unique(groups):
        m = groups == g
        std = values[m].std()
        z[m] = 0.0 if std < 1e-12 else (values[m] - values[m].mean()) / std
    return z
