"""PNG plots of a run's rewards: distributions original vs edited, flip rates, composite margins.

Figures are drawn on matplotlib's object API with the Agg canvas (no pyplot, no global backend
switch), so importing this module never changes a notebook's or another thread's plotting state.
Each function returns the PNG bytes; the caller decides where they go (local disk or fsspec).
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def reward_distributions_png(scores: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                             labels: tuple[str, str] = ("original", "edited")) -> bytes:
    """One histogram panel per reward: side 0 (original / jpg_0) against side 1 (edited / jpg_1)."""
    names = list(scores) or ["(no rewards)"]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = _figure(4.0 * cols, 3.0 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        a, b = (np.asarray(x, dtype=float) for x in scores.get(name, ([], [])))
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if a.size + b.size:
            both = np.concatenate([a, b])
            bins = np.linspace(both.min(), both.max() if both.max() > both.min() else both.min() + 1e-6, 21)
            ax.hist(a, bins=bins, alpha=0.6, label=f"{labels[0]} (n={a.size})")
            ax.hist(b, bins=bins, alpha=0.6, label=f"{labels[1]} (n={b.size})")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name)
        ax.set_xlabel("raw score")
    return _png(fig)


def flip_rate_png(rates: Mapping[str, float], title: str = "share of pairs where the edit scores lower") -> bytes:
    """A bar per reward (and the composite): the fraction of pairs whose side 1 scored below side 0."""
    fig = _figure(max(4.0, 1.0 + 0.9 * len(rates)), 3.2)
    ax = fig.add_subplot(1, 1, 1)
    names = list(rates)
    values = [rates[n] for n in names]
    bars = ax.bar(range(len(names)), values, color=["tab:red" if n == "composite" else "tab:blue" for n in names])
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("flip rate")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def margin_histogram_png(margins: Sequence[float], min_margin: float = 0.0, title: str = "composite margin") -> bytes:
    fig = _figure(5.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    m = np.asarray(margins, dtype=float)
    m = m[np.isfinite(m)]
    if m.size:
        ax.hist(m, bins=min(30, max(5, m.size // 2)), color="tab:green", alpha=0.8)
    ax.axvline(min_margin, color="black", linestyle="--", label=f"min_margin = {min_margin:g}")
    ax.legend(fontsize=8)
    ax.set_xlabel("|composite_1 - composite_0|")
    ax.set_ylabel("pairs")
    ax.set_title(f"{title} (n={m.size})", fontsize=10)
    return _png(fig)
