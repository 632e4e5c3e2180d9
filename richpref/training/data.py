"""Training pairs: Pick-a-Pic-format sources, weighted mixing, decoding and augmentation.

A source is any table with `caption`, `jpg_0`, `jpg_1` (encoded image bytes) and `label_0`
(1 = jpg_0 preferred, 0 = jpg_1 preferred), read with `datasets` so that a 300 GB source is memory
mapped, not loaded. Rows whose label is not 0 or 1 (Pick-a-Pic's 0.5 ties) are dropped and counted.

Everything random about sample number p of a run (which source and row, crop, flip, empty prompt,
VAE sample, noise, timestep) is a function of (seed, p) alone. So a run resumed from a checkpoint
sees exactly the samples the uninterrupted run would have seen, whatever the process count.
"""
from __future__ import annotations

import glob
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from fsspec.implementations.local import LocalFileSystem

from ..schemas.training import PairSourceConfig
from ..sources import run_folder_pairs, run_of_pairs
from ..tasks.pickapic_source import blank_caption
from .pair_rows import FileRows, LocalPairs, located

log = logging.getLogger("richpref")

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
# Binary PNG (mode L, 0 = unchanged, 255 = changed), the size of jpg_0/jpg_1, may be null: where the
# edit changed the original. Read only under `loss_mask: edit_region`.
MASK_COLUMN = "edit_mask"


class DataError(ValueError):
    """A training source that cannot be used as given; the message says which and how to fix it."""


def seed_for(*parts: Any) -> int:
    """A 63-bit seed derived from `parts` (stable across processes, machines and Python runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def parquet_files(path: str) -> list[str]:
    """Parquet files of a file, a folder (e.g. a run's `pairs/`) or a glob; temp files of writers skipped."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not glob.glob(str(p)):
        root = Path(__file__).resolve().parents[2]
        if glob.glob(str(root / p)):
            p = root / p
    if pairs := run_folder_pairs(LocalFileSystem(), str(p)):
        raise DataError(f"data source path {path!r} is a run's folder: give its pairs, {pairs!r}")
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet"))
    else:
        files = sorted(f for f in glob.glob(str(p)) if f.endswith(".parquet"))
    if not files:
        raise DataError(f"data source path {path!r} has no .parquet files (give a file, a folder of them or a glob)")
    return files


def pair_files(path: str) -> list[str]:
    """The Parquet files of a pair source's path: local (`parquet_files`) or a URL (s3://, gs://, hf://,
    listed without copying anything); DataError naming the path when it has none."""
    if "://" not in path:
        return parquet_files(path)
    from richpref.common.objstore import cannot_list, url_to_fs

    from .remote_pairs import remote_parquet_files

    try:
        fs, inner = url_to_fs(path)
        pairs = run_folder_pairs(fs, inner)
        files = [] if pairs else remote_parquet_files(path)
    except Exception as exc:  # noqa: BLE001 - s3fs/botocore: a missing bucket, no or a refused credential, no endpoint
        raise DataError(f"data source path {path!r} {cannot_list(path, exc)}") from exc
    if pairs:
        raise DataError(f"data source path {path!r} is a run's folder: give its pairs, {path[: path.index('://') + 3] + pairs!r}")
    if not files:
        raise DataError(f"data source path {path!r} has no .parquet files (give a file, a folder of them or a glob)")
    return files


def check_has_pairs(label: str, path: str, rows: int, files: int) -> None:
    """DataError when the Parquet files of a pair source hold 0 rows together (a curate run that kept no
    pair: each shard is an empty file), from their footers; before, training failed in `datasets`, twice."""
    if rows == 0:
        from richpref.common.objstore import url_to_fs

        run = run_of_pairs(*url_to_fs(path)) if "://" in path else run_of_pairs(LocalFileSystem(), path)
        raise DataError(f"data source {label!r}: {path} holds no pairs (its {files} Parquet file(s) have 0 rows); "
                        f"a run that kept none: `richpref summary {run or 'RUN'}` shows why its rows were rejected")


def load_pair_source(src: PairSourceConfig, need_mask: bool = False):
    """The source as a `datasets.Dataset` of the four Pick-a-Pic columns (and `edit_mask` when
    `need_mask`), ties and bad labels dropped."""
    import datasets

    if src.path is not None and "://" in src.path:  # s3://, gs://, hf://: by row group, no local copy
        from .remote_pairs import RemotePairs

        ds = RemotePairs(pair_files(src.path))
        check_has_pairs(src.label, src.path, len(ds), len(ds.files))
    elif src.path is not None:
        from ..sources.parquet import footer

        files = parquet_files(src.path)
        # A run's shard that kept no pair is an empty file, which `datasets` cannot read ("BatchSize must be
        # greater than 0"): left out
        rows = [footer(f).num_rows for f in files]  # read already by the preflight and the data key: cached
        check_has_pairs(src.label, src.path, sum(rows), len(files))
        files, rows = zip(*[(f, n) for f, n in zip(files, rows) if n > 0])
        ds = LocalPairs(datasets.load_dataset("parquet", data_files=list(files), split="train"),
                        FileRows(list(files), list(rows)))
    else:
        try:
            ds = LocalPairs(datasets.load_dataset(src.dataset, split=src.split))
        except Exception as exc:  # noqa: BLE001 - name the source, keep the cause
            raise DataError(
                f"data source {src.label!r}: cannot load dataset {src.dataset!r} split {src.split!r} ({exc}). "
                "Pick-a-Pic v2 is large and has moved before: download its Parquet files and give `path` instead."
            ) from exc
    missing = [c for c in PAIR_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(
            f"data source {src.label!r} lacks column(s) {missing} (has {sorted(ds.column_names)}); "
            "training needs Pick-a-Pic columns caption, jpg_0, jpg_1, label_0"
        )
    masked = need_mask and MASK_COLUMN in ds.column_names
    if need_mask and not masked:  # e.g. Pick-a-Pic pairs mixed with RPO's: no edit relates their two images
        log.info("data source %s has no %s column: its pairs' loss covers the whole image", src.label, MASK_COLUMN)
    ds = ds.select_columns(list(PAIR_COLUMNS) + ([MASK_COLUMN] if masked else []))
    if src.limit is not None:
        ds = ds.select(range(min(src.limit, len(ds))))
    labels = np.asarray(ds["label_0"], dtype=np.float64)
    keep = np.flatnonzero((labels == 0) | (labels == 1))
    if len(keep) < len(ds):
        log.info("data source %s: dropped %d of %d rows whose label_0 is not 0 or 1 (ties)",
                 src.label, len(ds) - len(keep), len(ds))
        ds = ds.select(keep)
    # a pair without a caption has no prompt its preference is for: before, it trained as an unconditional one
    captioned = [i for i, c in enumerate(ds["caption"]) if blank_caption(c) is None]
    if len(captioned) < len(ds):
        log.info("data source %s: dropped %d of %d rows without a caption (null, or whitespace alone)",
                 src.label, len(ds) - len(captioned), len(ds))
        ds = ds.select(captioned)
    if len(ds) == 0:
        raise DataError(f"data source {src.label!r} has no usable pairs (no rows with label_0 in {{0, 1}} and a caption)")
    if masked:
        present = ds.present(MASK_COLUMN)
        if present < len(ds):
            log.info("data source %s: %d of %d pairs have no edit_mask; their loss covers the whole image",
                     src.label, len(ds) - present, len(ds))
    return ds


def has_masks(ds) -> bool:
    """Whether a loaded source holds an edit mask for any of its pairs."""
    return MASK_COLUMN in ds.column_names and ds.present(MASK_COLUMN) > 0


def split_heldout(ds, fraction: float, seed: int, label: str):
    """(train, held-out) rows of a source: row r is held out when a hash of (seed, label, r) falls below
    `fraction`, so the split is fixed for a run whatever the process count."""
    if fraction <= 0:
        return ds, None
    draws = [seed_for(seed, "heldout", label, r) % 100_000 for r in range(len(ds))]
    held = [r for r in range(len(ds)) if draws[r] < fraction * 100_000]
    if held and len(held) == len(ds):  # a handful of pairs can all draw low: the highest draw trains
        keep = max(held, key=lambda r: draws[r])
        log.warning("data source %s: heldout_fraction %g drew all %d pairs; pair %d trains", label, fraction,
                    len(ds), keep)
        held.remove(keep)
    if not held:
        log.warning("data source %s: heldout_fraction %g of %d pairs holds none out; no held-out metrics from it",
                    label, fraction, len(ds))
        return ds, None
    held_set = set(held)
    return ds.select([r for r in range(len(ds)) if r not in held_set]), ds.select(held)


class PairMixture:
    """Maps a run's sample number p to (source, row).

    Sample p comes from source s with probability weight_s / Σ weights; within a source, rows are
    drawn without replacement in a fresh permutation per pass (epoch). Both depend only on the seed.
    """

    BLOCK = 1 << 16

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("need one weight per source and at least one source")
        self.sizes = [int(n) for n in sizes]
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.seed = seed
        self._counts_before: dict[int, np.ndarray] = {0: np.zeros(len(sizes), dtype=np.int64)}
        self._perm: dict[tuple[int, int], np.ndarray] = {}
        self._last_block: tuple[int, np.ndarray] | None = None

    def _choices(self, block: int) -> np.ndarray:
        if self._last_block is not None and self._last_block[0] == block:
            return self._last_block[1]
        if len(self.sizes) == 1:
            choices = np.zeros(self.BLOCK, dtype=np.int64)
        else:
            rng = np.random.default_rng(seed_for(self.seed, "mixture", block))
            choices = rng.choice(len(self.sizes), size=self.BLOCK, p=self.probs)
        self._last_block = (block, choices)
        return choices

    def _counts(self, block: int) -> np.ndarray:
        """Draws per source in blocks [0, block): where each source's draw counter stands."""
        known = max(b for b in self._counts_before if b <= block)
        for b in range(known, block):
            self._counts_before[b + 1] = self._counts_before[b] + np.bincount(self._choices(b), minlength=len(self.sizes))
        return self._counts_before[block]

    def _row(self, source: int, draw: int) -> int:
        n = self.sizes[source]
        epoch = draw // n
        key = (source, epoch)
        if key not in self._perm:
            if len(self._perm) > 2 * len(self.sizes):
                self._perm.clear()
            self._perm[key] = np.random.default_rng(seed_for(self.seed, "rows", source, epoch)).permutation(n)
        return int(self._perm[key][draw % n])

    def locate(self, positions: Sequence[int]) -> list[tuple[int, int]]:
        out = []
        for p in positions:
            block, offset = divmod(int(p), self.BLOCK)
            before = self._counts(block)
            choices = self._choices(block)
            s = int(choices[offset])
            draw = int(before[s] + np.count_nonzero(choices[:offset] == s))
            out.append((s, self._row(s, draw)))
        return out


def _image(value: Any, where: str) -> Image.Image:
    """A pair's image as the curation's stages decode it (common/images.py), so that the pixels trained on
    are those the rewards scored."""
    from richpref.common.images import BadImage, as_rgb, decode_image

    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, Image.Image):
        return as_rgb(value)
    try:
        return decode_image(value)
    except BadImage as exc:
        raise DataError(f"{where}: {str(exc).removeprefix('bad_image: ')}") from None


@dataclass
class Augment:
    """Resize (shorter side), crop to a square and flip, decided per sample number."""

    resolution: int
    random_crop: bool = False
    hflip: bool = True
    proportion_empty_prompts: float = 0.0
    seed: int = 0

    def __call__(self, caption: str, img0: Image.Image, img1: Image.Image, label_0: float, position: int,
                 mask: Image.Image | None = None) -> dict:
        rng = np.random.default_rng(seed_for(self.seed, "augment", position))
        drop_prompt, flip, crop_u, crop_v = rng.random(4)
        original = (img0.height, img0.width)
        if img1.size != img0.size:  # the edit (or jpg_1) can differ in size: bring it to jpg_0's
            img1 = img1.resize(img0.size, Image.BILINEAR)
        chosen, rejected = (img0, img1) if label_0 == 1 else (img1, img0)
        res = self.resolution
        scale = res / min(original)
        size = (max(res, round(original[1] * scale)), max(res, round(original[0] * scale)))  # (w, h)
        if self.random_crop:
            top, left = int(crop_u * (size[1] - res + 1)), int(crop_v * (size[0] - res + 1))
        else:
            top, left = int(round((size[1] - res) / 2.0)), int(round((size[0] - res) / 2.0))
        do_flip = self.hflip and flip < 0.5
        arrays = []
        for img in (chosen, rejected):
            img = img.resize(size, Image.BILINEAR) if img.size != size else img
            img = img.crop((left, top, left + res, top + res))
            if do_flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            arrays.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
        if mask is not None:  # the same resize, crop and flip as the pair's images
            mask = mask.resize(img0.size, Image.NEAREST) if mask.size != img0.size else mask
            mask = mask.resize(size, Image.BILINEAR).crop((left, top, left + res, top + res))
            if do_flip:
                mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
            mask = np.asarray(mask, dtype=np.float32)[None] / 255.0
        return {
            "mask": mask,
            "chosen": arrays[0],
            "rejected": arrays[1],
            "caption": "" if drop_prompt < self.proportion_empty_prompts else caption,
            "original_size": original,
            "crop_top_left": (top, left),
        }


class PairBatches(torch.utils.data.Dataset):
    """Item m = micro-batch m of this process: `batch_size` pairs decoded and augmented.

    Sample numbers: start + (m × world + rank) × batch_size + j, so processes never share a sample
    and the union over processes is the same stream whatever the world size.
    """

    def __init__(self, sources: list, mixture: PairMixture, augment: Augment, batch_size: int,
                 rank: int = 0, world: int = 1, start: int = 0, labels: Sequence[str] | None = None,
                 masks: bool = False) -> None:
        self.masks = masks
        self.sources = sources
        self.mixture = mixture
        self.augment = augment
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.start = start
        self.labels = list(labels or [str(i) for i in range(len(sources))])

    def __len__(self) -> int:
        return 2**62  # an endless stream; the sampler says which micro-batches to make

    def positions(self, micro: int) -> list[int]:
        base = self.start + (micro * self.world + self.rank) * self.batch_size
        return list(range(base, base + self.batch_size))

    def __getitem__(self, micro: int) -> dict:
        positions = self.positions(micro)
        where = self.mixture.locate(positions)
        rows: dict[tuple[int, int], dict] = {}
        for s in sorted({s for s, _ in where}):  # one batched read per source
            idx = [r for s2, r in where if s2 == s]
            cols = self.sources[s][idx]
            names = PAIR_COLUMNS + ((MASK_COLUMN,) if MASK_COLUMN in self.sources[s].column_names else ())
            for k, r in enumerate(idx):
                rows[(s, r)] = {c: cols[c][k] for c in names}
        samples = []
        for p, (s, r) in zip(positions, where):
            row = rows[(s, r)]
            at = f"data source {self.labels[s]!r} {located(self.sources[s], r)}"
            mask = _mask(row.get(MASK_COLUMN), at) if self.masks else None
            samples.append(self.augment(str(row["caption"] or ""), _image(row["jpg_0"], f"{at} jpg_0"),
                                        _image(row["jpg_1"], f"{at} jpg_1"),
                                        float(row["label_0"]), p, mask))
        # Chosen images first, then rejected ones: the layout the DPO loss splits in halves.
        pixels = np.stack([x["chosen"] for x in samples] + [x["rejected"] for x in samples])
        out = {}
        if self.masks:  # one mask per pair (a null mask weighs the whole image)
            res = self.augment.resolution
            out["masks"] = torch.from_numpy(np.stack([x["mask"] if x["mask"] is not None
                                                      else np.ones((1, res, res), np.float32) for x in samples]))
        return {
            **out,
            "pixels": torch.from_numpy(pixels),
            "captions": [x["caption"] for x in samples],
            "positions": torch.tensor(positions, dtype=torch.int64),
            "original_sizes": torch.tensor([x["original_size"] for x in samples], dtype=torch.int64),
            "crop_top_lefts": torch.tensor([x["crop_top_left"] for x in samples], dtype=torch.int64),
        }


def _mask(value: Any, where: str) -> Image.Image | None:
    from richpref.common.images import without_addresses

    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None:
        return None
    try:
        return Image.open(io.BytesIO(value)).convert("L")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"{where}: cannot decode edit_mask ({without_addresses(exc)})") from None


def load_sources(configs: list[PairSourceConfig], need_mask: bool = False) -> tuple[list, list[str]]:
    if not configs:
        raise DataError("finetune.data is empty: give at least one Pick-a-Pic-format source (path or dataset)")
    sources = [load_pair_source(c, need_mask) for c in configs]
    labels = [c.label for c in configs]
    if need_mask and not any(has_masks(ds) for ds in sources):
        raise DataError(f"loss_mask: edit_region, but no pair of data source(s) {labels} has an {MASK_COLUMN}: there is "
                        "no region to weight; export the pairs with edit masks (the export stage writes them), or set "
                        "loss_mask: none")
    for c, ds in zip(configs, sources):
        log.info("data source %s: %d pairs, weight %g", c.label, len(ds), c.weight)
    return sources, labels
