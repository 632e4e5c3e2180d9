"""LLaVA-OneVision's anyres grid, capped at `image.max_tiles` tiles per image.

An anyres model cuts an image into tiles of its vision tower's size (384 px for LLaVA-OneVision, up to
6x6 of them), picking the grid from `image_grid_pinpoints`, and encodes each tile plus one base view.
Capping the grid keeps only the pinpoints of at most `max_tiles` tiles: a 7B critic then spends at
most (max_tiles + 1) x 729 image tokens per image, whatever the image's size, without shrinking it.

The model config and the processor must agree on the grid (one computes the feature count, the other
cuts the pixels), so both are rewritten together: on a loaded model in-process, and for a launched
server (vLLM, SGLang, `transformers serve`) in an overlay folder that links the checkpoint's files and
rewrites only the JSON files naming the grid.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

GRID_KEY = "image_grid_pinpoints"


class NotAnAnyresModel(ValueError):
    """image.max_tiles was set for a model without an anyres grid."""


def tiles(pinpoint: list[int], tile: int) -> int:
    """Number of tiles of a [height, width] pinpoint."""
    return (pinpoint[0] // tile) * (pinpoint[1] // tile)


def capped_pinpoints(pinpoints: list[list[int]], tile: int, max_tiles: int) -> list[list[int]]:
    """The pinpoints of at most `max_tiles` tiles, in their order."""
    kept = [list(p) for p in pinpoints if tiles(p, tile) <= max_tiles]
    if not kept:
        smallest = min(tiles(p, tile) for p in pinpoints)
        raise ValueError(f"image.max_tiles={max_tiles} leaves no grid: the smallest has {smallest} tiles of {tile} px")
    return kept


def _tile_of(config: dict, pinpoints: list[list[int]]) -> int:
    size = (config.get("vision_config") or {}).get("image_size")
    return int(size) if size else min(min(p) for p in pinpoints)


def _require_grid(config: dict, where: str) -> list[list[int]]:
    grid = config.get(GRID_KEY)
    if not grid:
        raise NotAnAnyresModel(
            f"image.max_tiles caps an anyres grid (LLaVA-OneVision, LLaVA-NeXT); {where} is "
            f"{config.get('model_type', 'a model')} without one: cap its image tokens with image.max_pixels"
        )
    return grid


def cap_loaded(model: Any, processor: Any, max_tiles: int) -> list[list[int]]:
    """Cap the grid of a model loaded in-process (its config and its image processor)."""
    config = model.config.to_dict()
    grid = capped_pinpoints(_require_grid(config, model.config.name_or_path or "the model"),
                            _tile_of(config, config[GRID_KEY]), max_tiles)
    model.config.image_grid_pinpoints = grid
    inner = getattr(model, "model", None)  # the base model keeps its own reference in some versions
    if inner is not None and getattr(inner, "config", None) is not None and inner.config is not model.config:
        inner.config.image_grid_pinpoints = grid
    processor.image_processor.image_grid_pinpoints = grid
    return grid


def _rewrite(value: Any, grid: list[list[int]]) -> Any:
    if isinstance(value, dict):
        return {k: grid if k == GRID_KEY else _rewrite(v, grid) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, grid) for v in value]
    return value


def capped_model_dir(model_dir: str | os.PathLike, max_tiles: int, root: str | os.PathLike | None = None) -> Path:
    """A folder serving `model_dir` with the grid capped: the checkpoint's files linked, its JSON files
    that name the grid rewritten. The same checkpoint and cap give the same folder (reused)."""
    src = Path(model_dir).resolve()
    config = json.loads((src / "config.json").read_text())
    grid = capped_pinpoints(_require_grid(config, str(src)), _tile_of(config, config.get(GRID_KEY) or []), max_tiles)
    tag = hashlib.sha256(f"{src}\0{max_tiles}".encode()).hexdigest()[:16]
    dest = Path(root or Path(tempfile.gettempdir()) / "richpref-capped-grids") / f"{src.name}-tiles{max_tiles}-{tag}"
    if (dest / "config.json").exists():
        return dest
    staging = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=_mkdir(dest.parent)))
    for entry in src.iterdir():
        target = staging / entry.name
        if entry.suffix == ".json" and GRID_KEY in entry.read_text(encoding="utf-8", errors="replace"):
            target.write_text(json.dumps(_rewrite(json.loads(entry.read_text()), grid), indent=2))
        else:
            target.symlink_to(entry.resolve())
    try:
        staging.rename(dest)
    except OSError:  # another process made it first: theirs is the same
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


__all__ = ["NotAnAnyresModel", "cap_loaded", "capped_model_dir", "capped_pinpoints", "tiles"]
