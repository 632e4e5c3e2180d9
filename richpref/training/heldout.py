"""Held-out diagnostics of a DPO run: implicit accuracy and reward margin on pairs it never trains on.

The training loss alone says little: it falls whenever the model drifts from the reference in a way
that happens to separate the training pairs (DiffusionDPO#11, flow_grpo#54). Every `eval_every` steps
the held-out pairs (a fixed fraction of each source, split by data.split_heldout) are scored with
fixed (ε, σ/t) draws, so successive evaluations differ only by the weights. When the training loss
has fallen while held-out accuracy stays near 0.5, a warning says so (in the log and metrics.jsonl).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import Augment, PairBatches, seed_for

log = logging.getLogger("richpref")

CHANCE_BAND = 0.05  # |acc − 0.5| below this counts as chance
LOSS_DROP = 0.1  # relative fall of the training loss that makes chance-level held-out accuracy suspicious
PLOT = "heldout.png"


class EachPairOnce:
    """The pairs an evaluation scores, each once: all held-out pairs of every source, or `limit` of them
    drawn (for the run's seed) uniformly from all, so each source counts by its number of pairs. `locate`
    (PairMixture's) gives position p the p-th; past the end it wraps, to fill a last batch whose extra
    margins are not counted."""

    def __init__(self, sizes: list[int], limit: int, seed: int) -> None:
        total = sum(sizes)
        chosen = np.arange(total)
        if total > limit:
            chosen = np.sort(np.random.default_rng(seed_for(seed, "heldout-pairs")).permutation(total)[:limit])
        starts = np.cumsum([0, *sizes[:-1]])
        source = np.searchsorted(starts, chosen, side="right") - 1
        self.pairs = [(int(s), int(g - starts[s])) for s, g in zip(source, chosen)]

    def locate(self, positions) -> list[tuple[int, int]]:
        return [self.pairs[int(p) % len(self.pairs)] for p in positions]


class HeldOut:
    def __init__(self, sources: list, cfg, batch_size: int, labels: list[str] | None = None) -> None:
        pairs = EachPairOnce([len(s) for s in sources], cfg.heldout_max_pairs, cfg.seed + 1)
        self.count = len(pairs.pairs)
        augment = Augment(cfg.resolution, False, False, 0.0, cfg.seed)
        self.batches = PairBatches(sources, pairs, augment, batch_size, labels=labels,
                                   masks=cfg.loss_mask == "edit_region")
        self.n_batches = -(-self.count // batch_size)
        self.draws = cfg.heldout_draws
        self.history: list[dict] = []
        self.warned = False

    @torch.no_grad()
    def evaluate(self, step_fn: Callable[[dict, str], object]) -> dict:
        """Implicit accuracy (ties half) and mean reward margin over the held-out pairs × draws;
        `step_fn(batch, tag)` returns the DPO terms of a batch under the draw named `tag`."""
        margins = []
        for draw in range(self.draws):
            drawn = [step_fn(self.batches[m], f"heldout-{draw}").margin.detach().float().cpu()
                     for m in range(self.n_batches)]
            margins.append(torch.cat(drawn)[:self.count])  # a last batch's filling is not counted
        margin = torch.cat(margins)
        acc = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
        return {"heldout_implicit_acc": acc, "heldout_reward_margin": float(margin.mean()),
                "heldout_pairs": self.count, "heldout_draws": self.draws}

    def record(self, step: int, result: dict, train_losses: list[float]) -> dict:
        """Add the evaluation at `step`; sets `warning` when loss fell but held-out accuracy is at chance."""
        out = {"step": step, "kind": "heldout", **result}
        self.history.append(out)
        warning = chance_warning(train_losses, [h["heldout_implicit_acc"] for h in self.history])
        if warning:
            out["warning"] = warning
            if not self.warned:
                log.warning("step %d: %s", step, warning)
                self.warned = True
        return out


def chance_warning(train_losses: list[float], heldout_accs: list[float]) -> str | None:
    """A warning when the training loss fell by LOSS_DROP or more while the last two held-out accuracies
    stayed within CHANCE_BAND of 0.5 (the model fits its training pairs without generalising)."""
    if len(train_losses) < 2 or len(heldout_accs) < 2 or train_losses[0] <= 0:
        return None
    fell = (train_losses[0] - min(train_losses[-3:])) / train_losses[0] >= LOSS_DROP
    chance = all(abs(a - 0.5) < CHANCE_BAND for a in heldout_accs[-2:])
    if fell and chance:
        return (f"training loss fell from {train_losses[0]:.4f} to {min(train_losses[-3:]):.4f} while held-out "
                f"implicit accuracy stays near 0.5 ({heldout_accs[-1]:.3f}): the model is not learning the "
                "preference (check the pairs, lower the learning rate, or raise beta)")
    return None


def metric_series(rows: list[dict]) -> dict[str, tuple[list, list]]:
    """What the plot draws, as (steps, values): the training loss and implicit accuracy of the logged
    steps (records with a loss), and the held-out implicit accuracy of each evaluation."""
    train = [r for r in rows if r.get("kind") != "heldout" and "loss" in r]
    held = [r for r in rows if r.get("kind") == "heldout"]
    steps = [r["step"] for r in train]
    return {"train_loss": (steps, [r["loss"] for r in train]),
            "train_acc": (steps, [r["implicit_acc"] for r in train]),
            "heldout_acc": ([r["step"] for r in held], [r["heldout_implicit_acc"] for r in held])}


def plot_metrics(output_dir: str | Path, metrics_file: str = "metrics.jsonl") -> Path | None:
    """Training loss and held-out implicit accuracy against steps, as <output_dir>/heldout.png; None
    without a metrics file."""
    path = Path(output_dir) / metrics_file
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = metric_series([json.loads(x) for x in path.read_text().splitlines() if x.strip()])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(*series["train_loss"], label="train loss")
    a.set_xlabel("step"), a.set_title("DPO loss")
    b.plot(*series["train_acc"], alpha=0.4, label="train")
    b.plot(*series["heldout_acc"], marker="o", label="held-out")
    b.axhline(0.5, color="grey", lw=0.8, ls="--")
    b.set_ylim(0, 1), b.set_xlabel("step"), b.set_title("implicit accuracy"), b.legend()
    fig.tight_layout()
    out = Path(output_dir) / PLOT
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
