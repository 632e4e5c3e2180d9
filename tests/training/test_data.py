"""Pair sources as the trainer reads them (richpref/training/data.py): edit masks under
`loss_mask: edit_region` when some sources have them and others do not."""
from __future__ import annotations

import pytest
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
