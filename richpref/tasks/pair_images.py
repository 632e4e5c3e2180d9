"""The two images of an exported pair: one size, one encoding, and the mask of where they differ.

The original (often a Pick-a-Pic JPEG of its own size) and its edit (made at the editor's working
size, stored as PNG) would otherwise leave in different sizes and formats, an asymmetry a reward or a
DPO-tuned model can pick up. Here both are brought to the size of the image on side 1 (an edit, at
its editor's size) and encoded alike: `png` (lossless) or `jpeg` at one quality (the source's, read
from its quantisation tables, unless given).

`edit_mask`: where the two images differ. A pixel is changed when the largest of its three channel
differences |jpg_0 - jpg_1| (0..255, on the images as exported) is above `threshold`; isolated
changed pixels (an opening with a 3x3 square) are dropped, then the changed region is dilated by
`dilation` pixels (a (2r+1)x(2r+1) square, so a changed w x h rectangle becomes (w+2r) x (h+2r)).
Stored as PNG, mode "L", 0 = unchanged, 255 = changed, the pair's width and height.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from richpref.common.images import BadImage, decode_image, encode_png, stored_upright

# The IJG standard luminance quantisation table (quality 50), in natural (row-major) order: what
# libjpeg scales for every `quality` (Annex K of the JPEG standard).
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)
DEFAULT_JPEG_QUALITY = 95  # when the source is not a JPEG and no quality is given


def _ijg_table(quality: int) -> np.ndarray:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((_IJG_LUMA * scale + 50) / 100), 1, 255)


def jpeg_quality(data: bytes) -> int | None:
    """The libjpeg quality (1..100) whose luminance table is nearest the JPEG's own, or None when
    `data` is not a JPEG. Encoders with their own tables get the nearest IJG quality."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not an image PIL reads: no quality to keep
        return None
    tables = getattr(img, "quantization", None)
    if img.format != "JPEG" or not tables:
        return None
    luma = np.asarray(tables.get(0, next(iter(tables.values()))), dtype=np.float64)  # natural order (Pillow >= 8.3)
    if luma.size != 64:
        return None
    errors = [(np.abs(_ijg_table(q) - luma).sum(), -q) for q in range(1, 101)]
    return -min(errors)[1]


def encode(image: Image.Image, image_format: str, quality: int) -> bytes:
    if image_format == "png":
        return encode_png(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def pair_quality(source: bytes, jpeg_quality_: int | None) -> int:
    """The JPEG quality of a pair: the one given, else the source image's, else DEFAULT_JPEG_QUALITY."""
    return jpeg_quality_ or jpeg_quality(source) or DEFAULT_JPEG_QUALITY


def pair_images(side0: bytes, side1: bytes, *, image_format: str = "png", quality: int = DEFAULT_JPEG_QUALITY,
                side0_is_source: bool = True) -> tuple[bytes, bytes]:
    """(jpg_0, jpg_1): both images at side 1's size, both encoded as `image_format` (`jpeg` at
    `quality`). A source JPEG on side 0 already at that size and quality, stored upright, is kept as it
    is, so neither image is compressed twice. Raises BadImage when a side cannot be decoded."""
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format {image_format!r}: expected png or jpeg")
    a, b = decode_image(side0), decode_image(side1)
    resized = a.size != b.size
    if resized:
        a = a.resize(b.size, Image.Resampling.LANCZOS)
    if (image_format == "jpeg" and side0_is_source and not resized and jpeg_quality(side0) == quality
            and stored_upright(side0)):
        out0 = side0
    else:
        out0 = encode(a, image_format, quality)
    return out0, encode(b, image_format, quality)


def change_mask(a: Image.Image, b: Image.Image, *, threshold: int, dilation: int) -> Image.Image:
    """Mode "L" mask (255 = changed) of where same-size `a` and `b` differ: see the module doc."""
    if a.size != b.size:
        raise ValueError(f"change_mask needs two images of one size, got {a.size} and {b.size}")
    x = np.asarray(a.convert("RGB"), dtype=np.int16)
    y = np.asarray(b.convert("RGB"), dtype=np.int16)
    changed = np.abs(x - y).max(axis=2) > threshold
    mask = Image.fromarray(np.where(changed, 255, 0).astype(np.uint8), mode="L")
    mask = mask.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))  # opening: drop specks
    if dilation > 0:
        mask = mask.filter(ImageFilter.MaxFilter(2 * dilation + 1))
    return mask


def edit_mask(jpg_0: bytes, jpg_1: bytes, *, threshold: int, dilation: int) -> bytes | None:
    """PNG bytes of the change mask of a pair's two exported images, or None when it cannot be
    computed (an image that does not decode, or two sizes)."""
    try:
        a, b = decode_image(jpg_0), decode_image(jpg_1)
    except BadImage:
        return None
    if a.size != b.size:
        return None
    return encode_png(change_mask(a, b, threshold=threshold, dilation=dilation))
