"""How two configs' values differ, for refusals that name it (richpref/schemas/common.py)."""
from __future__ import annotations

from richpref.schemas.common import setting_changes


def test_setting_changes_name_each_value_by_its_dotted_key():
    before = {"beta": 5000.0, "lora": {"rank": 4, "alpha": 4}, "data": [{"path": "a"}], "flow": {"mode_scale": 1.29},
              "loss_mask": "none"}
    now = {"beta": 5000.0, "lora": {"rank": 8, "alpha": 4}, "data": [{"path": "b"}], "flow": None,
           "loss_mask": "edit_region"}
    assert setting_changes(before, now) == ['data[0].path: "a" → "b"', 'flow: {"mode_scale": 1.29} → null',
                                            'lora.rank: 4 → 8', 'loss_mask: "none" → "edit_region"']
    assert setting_changes(before, dict(before)) == []
    # a list that grew is shown whole; a long one cut in its middle, a long path never
    grown = setting_changes({"data": [{"path": "a"}]}, {"data": [{"path": "a"}, {"path": "b" * 80}]})
    assert grown == ['data: [{"path": "a"}] → [{"path": "a"}, {"path": "bbbbbbbbbbbb ... '
                     'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}]']
    path = "/" + "x" * 200
    assert setting_changes({"p": "a"}, {"p": path}) == [f'p: "a" → "{path}"']
