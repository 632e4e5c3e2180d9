"""Image bytes in and out of tables (richpref/common/images.py), each rule on images made by hand."""
from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from image_helpers import encoded
from richpref.common.images import (MAX_PIXELS, BadImage, decode_image, encode_png, flat_reason, pixel_change,
                                    side_by_side)


@pytest.mark.parametrize("data,reason", [
    (None, "bad_image: empty image bytes"),
    (b"", "bad_image: empty image bytes"),
    (b"not an image at all", "bad_image: cannot decode (UnidentifiedImageError: "),
    (encoded(Image.new("RGB", (64, 64)))[:60], "bad_image: cannot decode ("),  # cut off mid-file
    (encoded(Image.new("RGB", (7, 64))), "bad_image: 7x64 is too small (min 8x8)"),
    (encoded(Image.new("RGB", (64, 7))), "bad_image: 64x7 is too small (min 8x8)"),
])
def test_unusable_bytes_raise_the_rows_reject_reason(data, reason):
    with pytest.raises(BadImage) as err:
        decode_image(data)
    assert str(err.value).startswith(reason)


def test_a_reject_reason_is_the_same_in_every_process():
    """A row's reason is part of its shard's bytes: PIL names the buffer it read by its memory address,
    which differs between processes (a shard redone after a crash would differ from the first)."""
    with pytest.raises(BadImage) as err:
        decode_image(b"not an image at all")
    assert str(err.value) == "bad_image: cannot decode (UnidentifiedImageError: cannot identify image file <_io.BytesIO object>)"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG's signature, header chunk (a 1-bit image of that size) and an empty data chunk: no pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IDAT", b"")


def test_a_decompression_bomb_is_refused_from_its_header():
    """PIL refuses it while opening (over twice its own pixel limit), before this module's check."""
    with pytest.raises(BadImage, match=f"^bad_image: over {MAX_PIXELS} pixels$"):
        decode_image(_png_header_only(20_000, 10_000))
    with pytest.raises(BadImage, match=f"^bad_image: 10000x6401 is over {MAX_PIXELS} pixels$"):
        decode_image(_png_header_only(10_000, 6_401))


def test_the_smallest_and_the_largest_images_allowed_decode():
    assert decode_image(encoded(Image.new("RGB", (8, 8)))).size == (8, 8)
    assert decode_image(encoded(Image.new("1", (8000, 8000)))).size == (8000, 8000)  # exactly MAX_PIXELS


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    out = np.asarray(decode_image(encoded(rgba)))
    assert out[0, 2].tolist() == [255, 255, 255]  # fully transparent: the white behind
    assert out[0, 0].tolist() == [0, 0, 255]  # opaque: itself
    assert out[0, 1].tolist() == [127, 127, 127]  # half black over white
    grey_alpha = Image.new("LA", (8, 8), (0, 0))
    assert np.asarray(decode_image(encoded(grey_alpha)))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0] * 4)  # four black entries, the fourth transparent
    assert np.asarray(decode_image(encoded(palette, transparency=3)))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_pixels_scale_to_eight_bits_rounded():
    deep = np.array([[0, 257, 40000, 65535] * 2] * 8, dtype=np.uint16)
    out = np.asarray(decode_image(encoded(Image.fromarray(deep))))
    assert out.shape == (8, 8, 3) and out[0, :4, 0].tolist() == [0, 1, 156, 255]  # 40000 / 257 = 155.6
    wide = np.array([[-5, 0, 70_000, 65_535] * 2] * 8, dtype=np.int32)  # 32-bit pixels: clipped to 0..255
    assert np.asarray(decode_image(encoded(Image.fromarray(wide), "TIFF")))[0, :4, 0].tolist() == [0, 0, 255, 255]


def test_an_animated_image_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 200, 0))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(data))[0, 0, 0] > 150


def test_a_photo_is_turned_upright_as_its_exif_orientation_says():
    # A camera stores its pixels as the sensor read them and the turn in EXIF; every viewer (and
    # datasets', transformers' and diffusers' image loading) shows it turned. Before, the models
    # critiqued and edited it sideways, and the pairs left sideways.
    stored = np.zeros((16, 24, 3), dtype=np.uint8)
    stored[:8, :8] = (255, 255, 255)  # top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image is turned 90° clockwise for display
    data = encoded(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=100)
    upright = np.asarray(decode_image(data))
    assert upright.shape == (24, 16, 3) and upright[2, -3, 0] > 200 and upright[2, 2, 0] < 50  # now top right
    exif[0x0112] = 2  # mirrored: the top left shown top right, the size kept
    mirrored = np.asarray(decode_image(encoded(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=100)))
    assert mirrored.shape == (16, 24, 3) and mirrored[2, -3, 0] > 200 and mirrored[2, 2, 0] < 50
    exif[0x0112] = 1  # upright already: as stored; so is one whose EXIF block is broken (and it warns nothing)
    for block in (exif.tobytes(), b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert np.asarray(decode_image(encoded(Image.fromarray(stored), "JPEG", exif=block))).shape == (16, 24, 3)


def test_png_encoding_is_lossless():
    pixels = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(decode_image(encode_png(Image.fromarray(pixels)))), pixels)


def test_pixel_change_is_the_mean_absolute_difference_after_resizing_the_second():
    black, white = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (255, 255, 255))
    assert pixel_change(black, white) == 1.0
    half = Image.new("RGB", (4, 4))
    half.paste((255, 255, 255), (0, 0, 4, 2))
    assert pixel_change(black, half) == 0.5
    assert pixel_change(black, Image.new("RGB", (16, 16), (51, 51, 51))) == pytest.approx(0.2)
    dark, light = Image.new("RGB", (4, 4), (60, 60, 60)), Image.new("RGB", (4, 4), (100, 100, 100))
    assert pixel_change(dark, light) == pixel_change(light, dark) == pytest.approx(40 / 255)  # no uint8 wrap


def test_flat_reason_at_its_bound():
    stripes = np.zeros((2, 2, 3), np.uint8)
    stripes[0] = 10  # each channel: half 0, half 10: std 5
    image = Image.fromarray(stripes)
    assert flat_reason(image, 5.0) is None
    assert flat_reason(image, 5.01) == ("flat_image: pixel std 5.00 < 5.01 (near-constant, e.g. a safety "
                                        "checker's black image)")
    assert flat_reason(Image.new("RGB", (4, 4)), 0) is None  # 0 turns the check off
    assert flat_reason(Image.new("RGB", (4, 4)), 0.5).startswith("flat_image: pixel std 0.00 < 0.5 ")
    one_channel = np.zeros((2, 2, 3), np.uint8)
    one_channel[0, :, 2] = 10  # the most varied channel decides
    assert flat_reason(Image.fromarray(one_channel), 5.0) is None


def test_side_by_side_scales_the_right_image_to_the_left_ones_height():
    left, right = Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (10, 40), (0, 0, 255))
    out = side_by_side(left, right)
    assert out.size == (35, 20)  # the right one at 5x20
    assert out.getpixel((0, 0)) == out.getpixel((29, 19)) == (255, 0, 0)
    assert out.getpixel((30, 0)) == out.getpixel((34, 19)) == (0, 0, 255)
    assert side_by_side(left, Image.new("RGB", (1, 200))).size == (31, 20)  # never narrower than 1 px
