"""The DPO reference at the start of training: what step 0 should show, and a warning when it does not.

Before the first update the trained model is its reference when the reference is the model training
starts from (the base for a fresh run, `init_from` with `reference: init`): every margin is 0, the loss
is log 2 and the implicit accuracy 0.5. A reference that is not the starting model (`reference: base`
over tuned `init_from` weights) starts elsewhere, and at β = 5000 far elsewhere: the first steps then
chase the reference gap rather than the preferences.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger("richpref")

LOG2 = math.log(2)
LOSS_TOLERANCE = 1e-3
ACC_TOLERANCE = 0.1


def start_warning(loss: float, implicit_acc: float) -> str | None:
    """Why step 0's loss / implicit accuracy are far from log 2 / 0.5, or None when they are not."""
    far = []
    if abs(loss - LOG2) > LOSS_TOLERANCE:
        far.append(f"loss {loss:.4f} (log 2 = {LOG2:.4f})")
    if abs(implicit_acc - 0.5) > ACC_TOLERANCE:
        far.append(f"implicit accuracy {implicit_acc:.2f} (0.5)")
    if not far:
        return None
    return (f"step 0: {' and '.join(far)}: the model does not start at its reference; with init_from, "
            "`reference: init` starts the reference from the same weights")


def log_start(loss: float, implicit_acc: float, reference: str) -> str | None:
    """Log step 0 (the metrics of the first step, computed before any update); warn when far off."""
    log.info("step 0 (before any update, reference: %s): loss %.4f, implicit accuracy %.2f", reference, loss,
             implicit_acc)
    warning = start_warning(loss, implicit_acc)
    if warning:
        log.warning("%s", warning)
    return warning
