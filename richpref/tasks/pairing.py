"""When a composite margin is a tie: identical images, and margins within float noise of the threshold.

Reward models run in float32 (or 16-bit on request), and the same image does not get bit-identical
scores in different batches: a batched matmul sums in another order on another processor. Measured on
the tiny rewards (CPU), the same image scored alone and in a batch of 9 differs by up to 1e-6 of the
score's magnitude (8 float32 ulps). So a tie cannot be `margin <= min_margin` on its own:

- two images with the same bytes are a tie by definition, whatever their scores;
- a margin counts as a tie when it is within float noise of `min_margin`. Noise of relative size `rho`
  on a raw score of magnitude up to `scale` moves its z-score by up to `rho * scale / std` (std of the
  standardisation group); a composite by the weighted sum of that over its rewards; a margin by the
  noise of both its sides (rewards with weight 0 add nothing). `rho` is 2^-15 (3.1e-5, 30x the measured float32 noise) for float32 scores,
  4 ulps of the dtype (3.9e-3) for float16 and (3.1e-2) bfloat16: 16-bit models round their outputs
  to a few ulps of their own precision.
"""
from __future__ import annotations

import numpy as np

RELATIVE_NOISE = {"float32": 2.0 ** -15, "float16": 4 * 2.0 ** -10, "bfloat16": 4 * 2.0 ** -7}


def relative_noise(dtype: object) -> float:
    """`rho` for scores computed in `dtype` (a torch dtype or its name); unknown dtypes count as float32."""
    name = str(dtype).removeprefix("torch.")
    return RELATIVE_NOISE.get(name, RELATIVE_NOISE["float32"])


def scorer_dtype(scorer: object) -> str:
    """The dtype a scorer computes in: its own `dtype`, a VLM scorer's model dtype, else float32."""
    dtype = getattr(scorer, "dtype", None)
    if dtype is None:
        dtype = getattr(getattr(getattr(scorer, "vlm", None), "model", None), "dtype", None)
    return str(dtype or "float32").removeprefix("torch.")


def standardise(values: np.ndarray, groups: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(z, spread). Without groups: (x - mean) / std over all values. With groups: each value minus
    its group's mean, over the spread of all values around their group means (pooled), so a group of
    two images does not turn any gap, 1e-4 or 2.0, into the same +-1. No spread: z is 0. Non-finite
    values (a report-only reward with no score) take no part and get NaN."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):  # a shard without a pair to score: nothing to standardise, and no empty-mean warning
        return values.copy(), 0.0
    finite = np.isfinite(values)
    if not finite.all():
        z = np.full_like(values, np.nan)
        z[finite], spread = standardise(values[finite], None if groups is None else np.asarray(groups)[finite])
        return z, spread
    if groups is None:
        dev = values - values.mean()
    else:
        groups = np.asarray(groups)
        means = {g: values[groups == g].mean() for g in np.unique(groups)}
        dev = values - np.array([means[g] for g in groups])
    spread = float(np.sqrt(np.mean(dev ** 2)))
    if spread < 1e-12:
        return np.zeros_like(values), 0.0
    return dev / spread, spread


def z_noise(values: np.ndarray, spread: float, rho: float) -> float:
    """How far relative noise `rho` on the raw scores can move a z-score: rho * max|x| / spread
    (0 without spread: the z-scores are exactly 0)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return 0.0 if spread < 1e-12 or not len(values) else float(rho * np.abs(values).max() / spread)
