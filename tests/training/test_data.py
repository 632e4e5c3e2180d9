"""Pair sources as the trainer reads them (richpref/training/data.py): the held-out split, the weighted
mixture and its resume, micro-batches across processes, the chosen image first, and edit masks under
`loss_mask: edit_region` when some sources have them and others do not."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from image_helpers import encoded
from test_flow_step import write_brightness_pairs

from richpref.schemas.training import PairSourceConfig
from richpref.training.data import Augment, DataError, PairBatches, PairMixture, has_masks, load_sources


def test_a_source_without_edit_masks_trains_on_whole_images_beside_a_masked_one(tmp_path):
    # before, RPO's pairs mixed with Pick-a-Pic's (no edit relates their two images, so no mask) were
    # refused under loss_mask: edit_region
    rpo = PairSourceConfig(name="rpo", path=str(write_brightness_pairs(tmp_path / "rpo.parquet", 4, masks=True)))
    pickapic = PairSourceConfig(name="pickapic", path=str(write_brightness_pairs(tmp_path / "pickapic.parquet", 4)))
    sources, labels = load_sources([rpo, pickapic], need_mask=True)
    assert has_masks(sources[0]) and not has_masks(sources[1])
    mixture = PairMixture([len(s) for s in sources], [1.0, 1.0], 0)
    batch = PairBatches(sources, mixture, Augment(32, hflip=False), 8, labels=labels, masks=True)[0]
    where = [s for s, _ in mixture.locate(batch["positions"].tolist())]
    assert set(where) == {0, 1}
    for s, mask in zip(where, batch["masks"]):
        if s == 1:  # the whole image
            assert mask.min() == 1
        else:  # the edit's region: the top half
            assert mask[:, :15].min() == 1 and mask[:, 17:].max() == 0
    with pytest.raises(DataError, match=r"edit_region, but no pair of data source\(s\) \['pickapic'\] has an edit_mask"):
        load_sources([pickapic], need_mask=True)


def _png(array: np.ndarray) -> bytes:
    return encoded(Image.fromarray(array.astype(np.uint8)))


def test_heldout_split_always_leaves_a_pair_to_train():
    import datasets

    from richpref.training.data import seed_for, split_heldout

    two = datasets.Dataset.from_dict({"caption": ["a", "b"]})
    train, held = split_heldout(two, 0.25, 0, "pairs")  # both rows draw below 0.25 (a tiny curate run's pairs)
    draws = [seed_for(0, "heldout", "pairs", r) % 100_000 for r in (0, 1)]
    assert (len(train), len(held)) == (1, 1) and train["caption"] == [["a", "b"][draws.index(max(draws))]]
    train, held = split_heldout(two.select([0]), 0.25, 0, "pairs")
    assert len(train) == 1 and held is None


def test_a_mixture_needs_a_weight_per_source_and_a_source():
    for sizes, weights in (([], []), ([3], [1.0, 2.0]), ([3, 4], [1.0])):
        with pytest.raises(ValueError, match="one weight per source and at least one source"):
            PairMixture(sizes, weights, 0)


def test_mixture_weights_epochs_and_resume_offsets():
    mix = PairMixture([10, 30], [3.0, 1.0], seed=7)
    where = mix.locate(range(4000))
    share = sum(s == 0 for s, _ in where) / len(where)
    assert share == pytest.approx(0.75, abs=0.03)
    # Within a source, the first pass over its rows is a permutation: no repeats before all are seen.
    first_pass = [r for s, r in where if s == 0][:10]
    assert sorted(first_pass) == list(range(10))
    # Resuming at sample 2500 with a fresh mixture gives the same draws as the uninterrupted stream.
    assert PairMixture([10, 30], [3.0, 1.0], seed=7).locate(range(2500, 2600)) == where[2500:2600]
    assert PairMixture([10, 30], [3.0, 1.0], seed=8).locate(range(100)) != where[:100]


def test_mixture_draws_across_blocks_as_one_stream():
    """Past a block of source choices (65,536 samples: any long run) each source's draws go on where the
    earlier blocks left them: every pass over a source is a permutation of its rows, and a fresh
    mixture resumed in a later block draws the same. Blocks of 8 here, so 200 samples cross 25 of them."""
    class SmallBlocks(PairMixture):
        BLOCK = 8

    where = SmallBlocks([3, 5], [1.0, 1.0], seed=3).locate(range(200))
    for source, n in ((0, 3), (1, 5)):
        rows = [r for s, r in where if s == source]
        passes = [rows[k:k + n] for k in range(0, len(rows) - n + 1, n)]
        assert len(passes) >= 10 and all(sorted(p) == list(range(n)) for p in passes), (source, rows)
    assert SmallBlocks([3, 5], [1.0, 1.0], seed=3).locate(range(150, 200)) == where[150:]
    # each block's sources are its own draw (seeded by the block), not a block drawn before repeated
    from richpref.training.data import seed_for

    for block in (0, 1, 24):
        drawn = np.random.default_rng(seed_for(3, "mixture", block)).choice(2, size=8, p=[0.5, 0.5])
        assert [s for s, _ in where[8 * block:8 * block + 8]] == drawn.tolist()


def test_heldout_rows_are_those_whose_hash_falls_below_the_fraction():
    import datasets

    from richpref.training.data import seed_for, split_heldout

    rows = datasets.Dataset.from_dict({"caption": [f"c{r}" for r in range(400)]})
    train, held = split_heldout(rows, 0.1, 5, "pairs")
    expected = [r for r in range(400) if seed_for(5, "heldout", "pairs", r) % 100_000 < 10_000]
    assert held["caption"] == [f"c{r}" for r in expected] and 20 < len(expected) < 60
    assert train["caption"] == [f"c{r}" for r in range(400) if r not in set(expected)]


def test_positions_split_across_processes_like_one_process():
    mix, aug = PairMixture([5], [1.0], 0), Augment(64)
    one = PairBatches([None], mix, aug, batch_size=4, rank=0, world=1, start=8)
    two = [PairBatches([None], mix, aug, batch_size=2, rank=r, world=2, start=8) for r in (0, 1)]
    for micro in range(3):
        assert sorted(two[0].positions(micro) + two[1].positions(micro)) == one.positions(micro)


def test_batches_put_the_preferred_image_first_and_flip_pairs_together():
    import datasets

    red, blue = np.zeros((64, 64, 3)), np.zeros((64, 64, 3))
    red[..., 0], blue[..., 2] = 255, 255
    red[:, :32] = 0  # left half black: a flip is visible
    blue[:, :32] = 0
    ds = datasets.Dataset.from_dict({"caption": ["a", "b"], "jpg_0": [_png(red)] * 2, "jpg_1": [_png(blue)] * 2,
                                     "label_0": [1, 0]})
    batches = PairBatches([ds], PairMixture([2], [1.0], 0), Augment(64, hflip=True, seed=1), batch_size=2)
    flipped = []  # per sample: the bright half moved to the left (the originals' left half is black)
    for micro in range(8):
        b = batches[micro]
        flipped += [bool((b["pixels"][k].max(0).values[:, 0] > 0).all()) for k in range(2)]
        captions = list(b["captions"])
        px = b["pixels"]  # [chosen..., rejected...], values in [-1, 1]
        for k, cap in enumerate(captions):
            chosen, rejected = px[k], px[2 + k]
            chosen_is_red = chosen[0].max() > 0.9
            assert chosen_is_red == (cap == "a")  # label_0 = 1 -> jpg_0 (red) preferred
            assert rejected[0].max() > 0.9 or rejected[2].max() > 0.9
            # Both images of a pair flip together: their bright halves are on the same side.
            assert (chosen.max(0).values[:, 0] > 0).all() == (rejected.max(0).values[:, 0] > 0).all()
    assert 0 < sum(flipped) < len(flipped)  # half the samples, drawn per sample number
    unflipped = PairBatches([ds], PairMixture([2], [1.0], 0), Augment(64, hflip=False, seed=1), batch_size=2)
    assert not any((unflipped[m]["pixels"][:, :, :, 0] > -1).any() for m in range(8))
    empty = PairBatches([ds], PairMixture([2], [1.0], 0), Augment(64, proportion_empty_prompts=1.0), batch_size=2)
    assert list(empty[0]["captions"]) == ["", ""]


def test_pairs_decode_as_the_stages_do_transparency_over_white_and_16_bit_scaled():
    """The pixels trained on are those the rewards scored (common/images.decode_image); PIL's convert("RGB")
    gave black under transparent pixels and clipped 16-bit values to white."""
    import datasets

    from richpref.common.images import decode_image

    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[4:12, 4:12] = (255, 0, 0, 255)  # a red square on transparent black
    gray16 = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # 16-bit grey, 0 to 65535
    ds = datasets.Dataset.from_dict({"caption": ["a"], "jpg_0": [png(rgba)], "jpg_1": [png(gray16)], "label_0": [1]})
    pixels = PairBatches([ds], PairMixture([1], [1.0], 0), Augment(16, hflip=False), batch_size=1)[0]["pixels"]
    chosen, rejected = pixels[0].numpy(), pixels[1].numpy()
    assert chosen[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and chosen[:, 8, 8].tolist() == [1.0, -1.0, -1.0]
    expected = np.asarray(decode_image(png(gray16)), np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    assert np.array_equal(rejected, expected) and abs(float(rejected.mean())) < 0.01
    as_pil = datasets.Dataset.from_dict({"caption": ["a"], "jpg_0": [png(rgba)], "jpg_1": [png(rgba)], "label_0": [0]})
    as_pil = as_pil.cast_column("jpg_0", datasets.Image())  # a Hub dataset's Image feature: PIL images
    assert PairBatches([as_pil], PairMixture([1], [1.0], 0), Augment(16, hflip=False), batch_size=1)[0]["pixels"][
        1, :, 0, 0].tolist() == [1.0, 1.0, 1.0]
    empty = datasets.Dataset.from_dict({"caption": ["a"], "jpg_0": [b""], "jpg_1": [png(rgba)], "label_0": [1]})
    with pytest.raises(DataError, match="data source 'pairs' row 0 jpg_0: empty image bytes"):
        PairBatches([empty], PairMixture([1], [1.0], 0), Augment(16), batch_size=1, labels=["pairs"])[0]


def _gradient(width: int, height: int, channel: int = 0) -> Image.Image:
    """Each column x has value x mod 256 in `channel`: a crop's offset shows in its pixels."""
    a = np.zeros((height, width, 3), np.uint8)
    a[..., channel] = (np.arange(width) % 256)[None, :]
    return Image.fromarray(a)


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def test_augment_resizes_the_shorter_side_crops_the_centre_and_flips_by_the_sample_number():
    from richpref.training.data import seed_for

    aug = Augment(32)  # the Diffusion-DPO recipe's defaults: centre crop, horizontal flips
    assert (aug.random_crop, aug.hflip) == (False, True)
    wide, tall = _gradient(100, 50), _gradient(50, 100)
    flips = {}
    for p in range(8):
        flip = np.random.default_rng(seed_for(0, "augment", p)).random(4)[1] < 0.5
        out = aug("c", wide, wide, 1.0, p)
        # 100x50 -> 64x32 (the shorter side to 32), then the centre 32 columns: x from 16 to 48
        expected = wide.resize((64, 32), Image.BILINEAR).crop((16, 0, 48, 32))
        expected = expected.transpose(Image.FLIP_LEFT_RIGHT) if flip else expected
        assert out["original_size"] == (50, 100) and out["crop_top_left"] == (0, 16)
        assert np.array_equal(out["chosen"], _pixels(expected)) and np.array_equal(out["rejected"], out["chosen"])
        flips[p] = flip
        out = Augment(32, hflip=False)("c", tall, tall, 1.0, p)
        assert out["crop_top_left"] == (16, 0)  # 50x100 -> 32x64, the middle 32 rows
        assert np.array_equal(out["chosen"], _pixels(tall.resize((32, 64), Image.BILINEAR).crop((0, 16, 32, 48))))
    assert 0 < sum(flips.values()) < 8


def test_augment_random_crop_and_a_second_image_or_mask_of_another_size():
    from richpref.training.data import seed_for

    img0, img1 = _gradient(100, 50), _gradient(80, 40, channel=1)  # the edit at another size
    mask = Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((25, 50), np.uint8)))  # 100x50, 2x2 blocks
    small_mask = mask.resize((20, 10), Image.NEAREST)  # the same mask at a fifth of the size
    aug = Augment(32, random_crop=True, hflip=False)
    for p in range(4):
        u, v = np.random.default_rng(seed_for(0, "augment", p)).random(4)[2:]
        out = aug("c", img0, img1, 0.0, p, small_mask)  # label 0: jpg_1 is chosen
        left = int(v * (64 - 32 + 1))  # any of the 33 offsets of a 32 crop in 64 columns; rows: 32 of 32
        assert out["crop_top_left"] == (int(u * 1), left) == (0, left)
        box = (left, 0, left + 32, 32)
        assert np.array_equal(out["rejected"], _pixels(img0.resize((64, 32), Image.BILINEAR).crop(box)))
        assert np.array_equal(out["chosen"], _pixels(img1.resize((100, 50), Image.BILINEAR).resize((64, 32), Image.BILINEAR).crop(box)))
        expected_mask = mask.resize((64, 32), Image.BILINEAR).crop(box)
        assert np.array_equal(out["mask"][0], np.asarray(expected_mask, np.float32) / 255.0)
        tall = _gradient(50, 100)
        assert aug("c", tall, tall, 1.0, p)["crop_top_left"] == (int(u * (64 - 32 + 1)), int(v * 1))
