"""The exported pair's images (richpref/tasks/pair_images.py): one size, one encoding, and `edit_mask`,
on hand-built images (no model)."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from image_helpers import encoded
from richpref.tasks.pair_images import change_mask, edit_mask, jpeg_quality, pair_images, pair_quality



def _noise(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("q", [35, 75, 90, 97])
def test_jpeg_quality_is_read_back_from_the_tables(q):
    assert jpeg_quality(encoded(_noise((32, 32)), "JPEG", quality=q)) == q
    assert jpeg_quality(encoded(_noise((32, 32)), "PNG")) is None
    assert pair_quality(encoded(_noise((32, 32)), "PNG"), None) == 95 and pair_quality(b"x", 80) == 80


def test_every_libjpeg_quality_is_read_back():
    # The tables follow libjpeg's formula in floats (libjpeg divides integers below 50: a table entry
    # may differ by one), which the nearest match absorbs at every quality.
    got = {q: jpeg_quality(encoded(_noise((8, 8)), "JPEG", quality=q)) for q in range(1, 101)}
    assert {q: v for q, v in got.items() if v != q} == {}


def test_a_1000x667_jpeg_original_and_its_edit_leave_at_one_size_and_one_format():
    original = encoded(_noise((1000, 667)), "JPEG", quality=85)
    edit = encoded(_noise((624, 416), seed=1), "PNG")  # an edit at SD 1.5's working size
    for fmt, pil in (("png", "PNG"), ("jpeg", "JPEG")):
        a, b = pair_images(original, edit, image_format=fmt, quality=pair_quality(original, None))
        ia, ib = Image.open(io.BytesIO(a)), Image.open(io.BytesIO(b))
        assert ia.size == ib.size == (624, 416)
        assert ia.format == ib.format == pil
        if fmt == "jpeg":  # the source's quality for both
            assert jpeg_quality(a) == jpeg_quality(b) == 85
    # PNG: the edit's pixels exactly (lossless)
    a, b = pair_images(original, edit, image_format="png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), np.asarray(Image.open(io.BytesIO(edit))))


def test_a_source_jpeg_already_at_the_pair_size_and_quality_is_not_compressed_twice():
    original = encoded(_noise((64, 48)), "JPEG", quality=90)
    a, b = pair_images(original, encoded(_noise((64, 48), 1), "PNG"), image_format="jpeg", quality=90)
    assert a == original and jpeg_quality(b) == 90
    a, _ = pair_images(original, encoded(_noise((64, 48), 1), "PNG"), image_format="png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(a))), np.asarray(Image.open(io.BytesIO(original))))


def test_a_source_jpeg_turned_by_exif_leaves_upright_as_both_images_are():
    # Kept as it was, its stored pixels stay sideways for the trainers that read pixels only
    # (Image.open(...).convert("RGB"), as Diffusion-DPO's scripts do), beside an upright edit.
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: shown 90° clockwise
    original = encoded(_noise((48, 64)), "JPEG", quality=90, exif=exif.tobytes())
    a, b = pair_images(original, encoded(_noise((64, 48), 1), "PNG"), image_format="jpeg", quality=90)
    assert a != original and Image.open(io.BytesIO(a)).size == Image.open(io.BytesIO(b)).size == (64, 48)


def test_edit_mask_of_a_changed_square_is_the_dilated_square():
    base = np.full((64, 80, 3), 100, np.uint8)
    edited = base.copy()
    edited[20:30, 30:42] = (100, 100, 200)  # a 12 x 10 square, changed in one channel by 100
    edited[5, 5] = (255, 0, 0)  # one isolated pixel: a speck, not a change
    edited[50:60, 10:20] += 32  # a change at the threshold: only one above it counts
    a, b = encoded(Image.fromarray(base), "PNG"), encoded(Image.fromarray(edited), "PNG")
    mask = Image.open(io.BytesIO(edit_mask(a, b, threshold=32, dilation=3)))
    assert mask.format == "PNG" and mask.mode == "L" and mask.size == (80, 64)
    expected = np.zeros((64, 80), np.uint8)
    expected[17:33, 27:45] = 255
    assert np.array_equal(np.asarray(mask), expected)
    # no dilation: the square itself; identical images: all zero
    m0 = change_mask(Image.fromarray(base), Image.fromarray(edited), threshold=32, dilation=0)
    assert (np.asarray(m0) == 255).sum() == 120
    # a dilation of one pixel: 14 x 12 (the smallest dilation a mask takes)
    m1 = change_mask(Image.fromarray(base), Image.fromarray(edited), threshold=32, dilation=1)
    assert (np.asarray(m1) == 255).sum() == 14 * 12
    assert not np.asarray(Image.open(io.BytesIO(edit_mask(a, a, threshold=32, dilation=3)))).any()


def test_edit_mask_is_null_when_it_cannot_be_computed():
    a = encoded(_noise((16, 16)), "PNG")
    assert edit_mask(a, b"not an image", threshold=32, dilation=3) is None
    assert edit_mask(a, encoded(_noise((20, 16)), "PNG"), threshold=32, dilation=3) is None


def test_export_rows_carry_the_pair_at_one_size_with_its_mask():
    from richpref.schemas.config import ExportConfig
    from richpref.tasks.export import export_rows

    original = encoded(Image.new("RGB", (100, 67), (10, 20, 30)), "JPEG", quality=80)
    edited = Image.new("RGB", (64, 40), (10, 20, 30))
    edited.paste((200, 20, 30), (10, 10, 20, 20))
    scores = pa.table({"item_id": ["i"], "status": ["ok"], "chosen": [1], "flipped": [False], "margin": [0.5],
                       "candidate_0": [-1], "candidate_1": [0]})

    def export(**cfg):
        t = export_rows(scores, pa.table({"prompt": ["p"], "image": [original], "model_id": ["m"]}),
                        pa.table({"image": [encoded(edited, "PNG")], "edit_prompt": ["e"], "model_id": ["m"], "editor": ["x"]}),
                        pa.table({"critique": ["c"], "model_id": ["m"]}), pa.table({"instructions": [["i"]], "model_id": ["m"]}),
                        pa.table({"source": ["s"]}), "h", cfg=ExportConfig(**cfg))
        row = t.to_pylist()[0]
        return row, [Image.open(io.BytesIO(row[c])) for c in ("jpg_0", "jpg_1", "edit_mask")]

    row, ims = export(image_format="jpeg")
    assert ims[0].size == ims[1].size == ims[2].size == (64, 40)
    assert ims[0].format == ims[1].format == "JPEG" and jpeg_quality(row["jpg_0"]) == jpeg_quality(row["jpg_1"]) == 80
    row, ims = export(mask_dilation=2)  # png by default
    assert ims[0].size == ims[1].size == ims[2].size == (64, 40) and ims[0].format == ims[1].format == "PNG"
    m = np.asarray(ims[2])
    assert ims[2].mode == "L" and set(np.unique(m)) <= {0, 255}
    assert m[8:22, 8:22].all() and int((m == 255).sum()) == 14 * 14  # the 10 x 10 square dilated by 2
