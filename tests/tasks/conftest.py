"""Fixtures the stage test files (tests/tasks/test_<stage>.py) share: `vlms` (critique, instruct,
check, filter) and `pickapic` (source, sample). Each was module-scoped in the one file that held its
users (and `vlms` again in test_check_stage.py, by import); the split spreads those users over
several modules, so both are session-scoped here: built once, never more often than before.
`paths`, `release_resident` and `mini_run` are in tests/conftest.py: tests outside this folder use
them too."""
from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from image_helpers import _scene, encoded


@pytest.fixture(scope="session")
def vlms(tmp_path_factory):
    """The tiny VLMs: "critic" (LLaVA-OneVision) and "qwen" (Qwen2.5-VL), loaded on CPU."""
    from richpref.models.tiny.vlm import build_tiny_llava_onevision, build_tiny_qwen2_5_vl
    from richpref.models.vlm import VisionLanguageModel

    root = tmp_path_factory.mktemp("vlms")
    models = {
        "critic": VisionLanguageModel.load(str(build_tiny_llava_onevision(root / "critic", seed=2)), device="cpu"),
        "qwen": VisionLanguageModel.load(str(build_tiny_qwen2_5_vl(root / "qwen", seed=3)), device="cpu"),
    }
    yield models
    for m in models.values():
        m.close()


def _jpeg(color) -> bytes:
    return encoded(_scene((48, 40), fg=color), "JPEG", quality=90)


@pytest.fixture(scope="session")
def pickapic(tmp_path_factory):
    """Pick-a-Pic v2 columns: label_0 = 1 (jpg_0 won), 0 (jpg_1 won), 0.5 (tie), null (unlabelled)."""
    rows = [
        ("a red apple", _jpeg((255, 0, 0)), _jpeg((0, 255, 0)), 1.0),
        ("a blue car", _jpeg((0, 0, 255)), _jpeg((255, 255, 0)), 0.0),
        ("two cats", _jpeg((0, 255, 255)), _jpeg((255, 0, 255)), 0.5),
        ("no label", _jpeg((9, 9, 9)), _jpeg((99, 99, 99)), None),
    ]
    table = pa.table({
        "caption": [r[0] for r in rows],
        "jpg_0": pa.array([r[1] for r in rows], pa.binary()),
        "jpg_1": pa.array([r[2] for r in rows], pa.binary()),
        "label_0": pa.array([r[3] for r in rows], pa.float64()),
    })
    path = tmp_path_factory.mktemp("pickapic") / "train-00000.parquet"
    pq.write_table(table, path)
    return SimpleNamespace(path=path, rows=rows)
