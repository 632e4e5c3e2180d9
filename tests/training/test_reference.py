"""The DPO reference of a continued fine-tune: `reference: init` (the default with init_from) starts
at loss log 2, as the reference code does by loading its reference from --unet_init; `reference: base`
over tuned weights does not, and step 0 warns about it."""
from __future__ import annotations

import logging
import math

import pytest

from richpref.schemas.training import FinetuneConfig
from test_finetune import metrics, pairs_file, tiny_config  # noqa: F401 - pairs_file is a fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["lora", "full"])
def tuned(request, tiny_models, pairs_file, tmp_path_factory):  # noqa: F811
    """A saved tiny fine-tune (3 steps at a large lr: far from the base) of each mode."""
    from richpref.training.train import train

    out = tmp_path_factory.mktemp(f"init-{request.param}") / "run"
    train(tiny_config(tiny_models, pairs_file, mode=request.param, max_train_steps=3, learning_rate=1e-2), out)
    return request.param, out


def test_reference_defaults_to_init_with_init_from_and_base_without():
    data = [{"name": "pairs", "path": "x"}]
    assert FinetuneConfig(data=data).reference == "base"
    assert FinetuneConfig(data=data, init_from="some/run").reference == "init"
    assert FinetuneConfig(data=data, init_from="some/run", reference="previous").reference == "init"
    assert FinetuneConfig(data=data, init_from="some/run", reference="base").reference == "base"
    with pytest.raises(ValueError, match="reference: previous needs init_from"):
        FinetuneConfig(data=data, reference="previous")


def test_continued_finetune_starts_at_log2_with_the_init_as_reference(tuned, tiny_models, pairs_file, tmp_path,  # noqa: F811
                                                                      caplog):
    from richpref.training.train import train

    mode, init = tuned
    cfg = tiny_config(tiny_models, pairs_file, mode=mode, init_from=str(init), max_train_steps=1)
    assert cfg.reference == "init"
    with caplog.at_level(logging.INFO, logger="richpref"):
        train(cfg, tmp_path / "init-ref")
    first = metrics(tmp_path / "init-ref")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["implicit_acc"] == pytest.approx(0.5)
    assert any("step 0" in r.getMessage() and "loss 0.6931" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "step 0" in r.getMessage()]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="richpref"):
        train(tiny_config(tiny_models, pairs_file, mode=mode, init_from=str(init), reference="base", max_train_steps=1),
              tmp_path / "base-ref")
    first = metrics(tmp_path / "base-ref")[0]
    assert abs(first["loss"] - math.log(2)) > 1e-2  # the base is not where training starts
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("step 0" in w and "does not start at its reference" in w for w in warnings), warnings


@pytest.mark.parametrize("tuned", ["lora"], indirect=True)
def test_a_lora_of_another_rank_is_refused_once_in_the_trainer_too(tuned, tiny_models, pairs_file, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    """The preflight refuses it (tests/training/test_flow_step.py); past it, the trainer's own load names the
    misfit as an input it refuses (not relaunched) instead of a size-mismatch RuntimeError."""
    from richpref.training import setup
    from richpref.training.flow_models import ArchMismatch
    from richpref.training.train import train

    _, init = tuned
    monkeypatch.setattr(setup, "lora_differences", lambda cfg, path: [])
    with pytest.raises(ArchMismatch, match=r"its LoRA does not fit this one .*size mismatch"):
        train(tiny_config(tiny_models, pairs_file, mode="lora", lora={"rank": 8}, init_from=str(init), max_train_steps=1),
              tmp_path / "other-rank")
