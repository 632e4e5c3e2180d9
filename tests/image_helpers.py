"""Image helpers the stage tests (tests/tasks/) share with the image backend tests outside that
folder (tests/models/, tests/scenarios/): diffusion settings for 64×64 runs, a
flat scene with a bright ellipse, image encoding and PNG decoding, the per-item seed transcribed from its contract.
Not a test module."""
from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageDraw


GEN = dict(steps=3, guidance_scale=5.0, height=64, width=64)
EDIT = dict(steps=4, strength=0.75)


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


def _png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    """`im` as the bytes of an image file in `fmt` (PIL's save options in `kw`)."""
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _scene(size=(64, 64), bg=(30, 60, 90), fg=(250, 200, 40)) -> Image.Image:
    """A flat background with a bright ellipse: clear edges, clear object."""
    im = Image.new("RGB", size, bg)
    w, h = size
    ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=fg)
    return im


def _seed_by_hand(base: int, item_id: str) -> int:
    # Transcribed from the contract, not imported: sha256("<base>:<item_id>"), first 8 hex digits.
    return int(hashlib.sha256(f"{base}:{item_id}".encode()).hexdigest()[:8], 16)
