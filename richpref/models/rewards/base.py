"""What every scorer shares: the two interfaces, safe checkpoint loading, batching, z-scores.

Two kinds of reward:

- `Reward.score(images, prompts)`: one number per image (higher is better), e.g. PickScore;
- `PairReward.score_pairs(originals, edits, prompts)`: one number per side of an (original, edit)
  pair that only makes sense for the pair, e.g. DINOv2 patch consistency of the edit with its original.

Checkpoints are read with safetensors or `torch.load(weights_only=True)`: never unpickled code.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("richpref")


class RewardLoadError(RuntimeError):
    """A reward checkpoint that is missing, unreadable or laid out differently from the reference."""


@runtime_checkable
class Reward(Protocol):
    model_id: str

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], *, batch_size: int = 8) -> np.ndarray: ...


@runtime_checkable
class PairReward(Protocol):
    model_id: str
    pairwise: bool

    def score_pairs(self, originals: Sequence[Image.Image], edits: Sequence[Image.Image], prompts: Sequence[str],
                    *, batch_size: int = 8) -> np.ndarray: ...


def batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def check_lengths(images: Sequence, prompts: Sequence) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")


def checkpoint_file(ref: str, filename: str | None) -> str:
    """Local path of `filename` inside `ref` (a directory, or a Hub repo id), or `ref` itself when it is
    a file. A Hub id is fetched with `hf_hub_download` (from the cache when HF_HUB_OFFLINE=1)."""
    p = Path(ref)
    if p.is_file():
        return str(p)
    if p.is_dir():
        if filename is None:
            raise RewardLoadError(f"{ref} is a directory: name the checkpoint file inside it (reward `file:`)")
        f = p / filename
        if not f.is_file():
            present = sorted(x.name for x in p.iterdir())[:20]
            raise RewardLoadError(f"{f} not found (the directory holds {present}); set the reward's `file:` to the checkpoint's name")
        return str(f)
    if filename is None:
        raise RewardLoadError(f"{ref!r} is neither a file nor a directory; give a local checkpoint path")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(ref, filename)
    except Exception as exc:  # noqa: BLE001 - offline misses, 404s, auth errors all mean "not available"
        raise RewardLoadError(
            f"cannot get {filename!r} from {ref!r} ({type(exc).__name__}: {exc}). Download it on a connected "
            f"machine (huggingface-cli download {ref} {filename}) or point the reward at a local directory."
        ) from exc


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A flat tensor dict from .safetensors, or from a torch pickle with `weights_only=True`.

    Accepts the `{'state_dict': ...}` wrapper of training checkpoints (HPSv2) and strips a DDP
    `module.` prefix when every key has it."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError and others
            raise RewardLoadError(
                f"{path}: cannot load with torch.load(weights_only=True) ({type(exc).__name__}: {exc}). "
                "richpref never unpickles arbitrary objects; convert the checkpoint to a plain state dict "
                "or safetensors once, outside the pipeline."
            ) from exc
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RewardLoadError(f"{path}: expected a dict of tensors (a state dict), got {type(sd).__name__}")
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_strict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict that fails naming the keys, ignoring only position-id buffers (not weights)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RewardLoadError(
            f"{what}: checkpoint does not match the expected layout "
            f"(missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'…' if len(unexpected) > 5 else ''}); is it the right checkpoint for this reward kind?"
        )


def load_lenient(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """load_state_dict that fails only on missing weights, as the references that load with
    `strict=False` do when their checkpoint holds extra tensors; returns the unexpected keys (the
    caller logs them). Position-id buffers are ignored both ways."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise RewardLoadError(
            f"{what}: checkpoint lacks {len(missing)} weights the model needs "
            f"({missing[:5]}{'…' if len(missing) > 5 else ''}; it has these the model does not use: "
            f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}); is it the right checkpoint for this reward kind?"
        )
    return list(unexpected)


def subdict(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


class LinearHead(torch.nn.Module):
    """The MLP head of ImageReward, the LAION aesthetic predictor and HP: Linear layers at
    `layers.{0,2,4,6,7}` with dropout (identity at inference) between and **no activations**.
    Sizes are read from the checkpoint, so the same class loads the real heads and tiny ones."""

    LINEAR_AT = (0, 2, 4, 6, 7)

    def __init__(self, sd: Mapping[str, torch.Tensor], what: str, strict: bool = True) -> None:
        super().__init__()
        try:
            shapes = [tuple(sd[f"layers.{i}.weight"].shape) for i in self.LINEAR_AT]
        except KeyError as exc:
            raise RewardLoadError(f"{what}: no {exc.args[0]!r}; expected a head with linear layers at "
                                  f"layers.{{0,2,4,6,7}} (keys found: {sorted(sd)[:8]})") from None
        mods: list[torch.nn.Module] = []
        for i in range(max(self.LINEAR_AT) + 1):
            if i in self.LINEAR_AT:
                out_f, in_f = shapes[self.LINEAR_AT.index(i)]
                mods.append(torch.nn.Linear(in_f, out_f))
            else:
                mods.append(torch.nn.Identity())  # Dropout in the reference: identity at inference
        self.layers = torch.nn.Sequential(*mods)
        self.unused_keys = load_lenient(self, sd, what) if not strict else load_strict(self, sd, what) or []
        self.in_features = shapes[0][1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


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
