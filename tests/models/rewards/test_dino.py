"""DINOv2 patch consistency windows against hand-placed ones: the grid covers the whole image, its last
window flush with the far edge (UPER's 224/112 grid on 512 px would otherwise stop at 448 px and
leave 23% of the area uncompared)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from richpref.models.rewards.dino import extract_windows, window_starts

# The flush-last-window rule is part of the reward-composition change; until it is in dino.py these
# cases fail. strict: once it lands they pass, and this marker must go.

# Hand-placed: every stride step that fits, then one window flush with the edge if the last one
# does not reach it.
HAND = [
    pytest.param((512, 224, 112), [0, 112, 224, 288]),  # 448 < 512: one more at 512 − 224
    ((448, 224, 112), [0, 112, 224]),  # 224 + 224 = 448: the grid already ends at the edge
    ((224, 224, 112), [0]),
    pytest.param((300, 224, 112), [0, 76]),
    pytest.param((64, 28, 14), [0, 14, 28, 36]),
    pytest.param((50, 28, 14), [0, 14, 22]),
    ((56, 28, 28), [0, 28]),
]


@pytest.mark.parametrize("args,starts", HAND)
def test_window_starts_by_hand(args, starts):
    assert window_starts(*args) == starts


def test_windows_are_cut_where_placed_and_cover_every_pixel():
    # Each pixel carries its own coordinates: red = x, green = y.
    w, h = 64, 50
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w)[None, :]
    arr[..., 1] = np.arange(h)[:, None]
    windows = extract_windows(Image.fromarray(arr), 28, 14)
    placed = [(top, left) for top in (0, 14, 22) for left in (0, 14, 28, 36)]  # row-major over (top, left)
    assert windows.shape == (len(placed), 28, 28, 3)
    covered = np.zeros((h, w), dtype=bool)
    for win, (top, left) in zip(windows, placed):
        assert (int(win[0, 0, 0]), int(win[0, 0, 1])) == (left, top)
        np.testing.assert_array_equal(win, arr[top:top + 28, left:left + 28])
        covered[top:top + 28, left:left + 28] = True
    assert covered.all()
