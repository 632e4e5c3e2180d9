"""Image bytes in and out of tables: decode defensively, encode losslessly."""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps

MAX_PIXELS = 64_000_000


class BadImage(ValueError):
    """An image that cannot be used; the message is the row's reject reason."""


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def without_addresses(exc: Exception) -> str:
    """`Type: message` without the memory addresses of objects it names (`<_io.BytesIO object at 0x7f…>`):
    a reason stored in a row must not differ between two processes that decode the same bytes."""
    return re.sub(r" at 0x[0-9a-fA-F]+>", ">", f"{type(exc).__name__}: {exc}")


def decode_image(data: bytes | None) -> Image.Image:
    """Bytes -> RGB image, upright, or BadImage naming what is wrong."""
    if data is None or len(data) == 0:
        raise BadImage("bad_image: empty image bytes")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below gives the reason; PIL's bomb warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", "Corrupt EXIF data")  # ignored as viewers do (`upright`)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_PIXELS:
                raise BadImage(f"bad_image: {img.width}x{img.height} is over {MAX_PIXELS} pixels")
            img.load()
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage(f"bad_image: over {MAX_PIXELS} pixels") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadImage(f"bad_image: cannot decode ({without_addresses(exc)})") from None
    if img.width < 8 or img.height < 8:
        raise BadImage(f"bad_image: {img.width}x{img.height} is too small (min 8x8)")
    return as_rgb(upright(img))


def _turn(img: Image.Image) -> int:
    """The EXIF orientation that turns `img` for display (2..8), else 1 (none, or an unreadable EXIF
    block, which viewers ignore too)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Corrupt EXIF data")  # a row's image, not a log line
            orientation = img.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels as stored
        return 1
    return orientation if orientation in range(2, 9) else 1


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says, as every viewer shows it (and datasets',
    transformers' and diffusers' image loading)."""
    return img if _turn(img) == 1 else ImageOps.exif_transpose(img)


def stored_upright(data: bytes) -> bool:
    """Whether an image file's pixels are stored as they are shown (no EXIF turn): a reader of pixels
    alone (as the Diffusion-DPO scripts read pairs) then sees what a viewer shows."""
    return _turn(Image.open(io.BytesIO(data))) == 1


def as_rgb(img: Image.Image) -> Image.Image:
    """An opened image as the RGB pixels every model here sees: the first frame, transparency over white,
    16-bit values scaled to 8 bits (PIL's own convert("RGB") keeps the colour under transparent pixels,
    often black, and clips 16-bit values to white)."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def pixel_change(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute per-pixel difference in [0, 1], after resizing b to a's size."""
    if a.size != b.size:
        b = b.resize(a.size, Image.BICUBIC)
    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB"), dtype=np.float32)
    return float(np.abs(x - y).mean() / 255.0)


def flat_reason(image: Image.Image, min_std: float) -> str | None:
    """`flat_image: ...` when the pixels are near-constant (every channel's std over the pixels, 0-255,
    is below `min_std`, as the edit stage's blank check): a safety checker's black output, a blank
    upload. None otherwise."""
    if min_std <= 0:
        return None
    std = float(np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).std(axis=0).max())
    if std >= min_std:
        return None
    return f"flat_image: pixel std {std:.2f} < {min_std:g} (near-constant, e.g. a safety checker's black image)"


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Both images at the left one's height, next to each other (for one-image VLM questions)."""
    h = left.height
    r = right.resize((max(1, round(right.width * h / right.height)), h), Image.BICUBIC)
    out = Image.new("RGB", (left.width + r.width, h), (255, 255, 255))
    out.paste(left.convert("RGB"), (0, 0))
    out.paste(r.convert("RGB"), (left.width, 0))
    return out
