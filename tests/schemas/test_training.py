"""Settings meant to reproduce published numbers: the checkpoints and versions the papers used."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_no_profile_or_default_names_the_removed_sd15_repo():
    from richpref.schemas.config import EditConfig, SampleConfig
    from richpref.schemas.training import FinetuneConfig

    removed = "runwayml/stable-diffusion-v1-5"  # taken off the Hub; the copy lives under the org below
    for f in [*REPO.glob("configs/*.yaml"), REPO / "README.md", *REPO.glob("docs/*.md")]:
        assert removed not in f.read_text(encoding="utf-8"), f
    assert SampleConfig().model == EditConfig().model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert FinetuneConfig.model_fields["model"].default == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_the_hpsv2_version_is_explicit_and_named_in_every_table():
    import pytest
    from pydantic import ValidationError

    from richpref.schemas.reward_titles import reward_titles
    from richpref.training.evaluation import to_markdown
    from richpref.schemas.config import RewardSpec
    from richpref.schemas.training import load_evaluate_config

    assert RewardSpec(kind="hpsv2", model="m").version == "v2.0"  # the hpsv2 package's default, RPO Table 1's
    assert RewardSpec(kind="hpsv2", model="m", file="HPS_v2.1_compressed.pt").version == "v2.1"
    with pytest.raises(ValidationError, match="is HPSv2 v2.1"):
        RewardSpec(kind="hpsv2", model="m", version="v2.0", file="HPS_v2.1_compressed.pt")
    with pytest.raises(ValidationError, match="takes no version"):
        RewardSpec(kind="clip", model="m", version="v2.0")
    paper = load_evaluate_config("evaluate-sd15-paper")  # compared with published tables: v2.0
    assert paper.rewards["hpsv2"].version == "v2.0"
    titles = reward_titles({n: s.model_dump() for n, s in paper.rewards.items()})
    table = to_markdown([{"model": "sd15", "hpsv2": 0.27, "hpsv2_win_vs_sd15": None}], titles)
    assert table.startswith("| model | hpsv2 (HPSv2 v2.0) | hpsv2 (HPSv2 v2.0) win vs sd15 |")


def test_rpo_recipe_is_dpo_on_100k_pickapic_rows_then_the_pairs_alone_from_that_checkpoint():
    """RPO §4.1: DPO-SD1.5 on the first 100k Pick-a-Pic v2 rows, then from it on the RPO pairs alone,
    the reference being the init (as the reference code's --unet_init)."""
    import re

    from richpref.schemas.training import load_finetune_config

    stage1 = load_finetune_config("finetune-sd15-dpo-pickapic100k")
    stage2 = load_finetune_config("finetune-sd15-rpo")
    [pickapic] = stage1.data
    assert (pickapic.dataset, pickapic.limit, stage1.init_from, stage1.reference) == \
        ("yuvalkirstain/pickapic_v2", 100_000, None, "base")
    assert [s.name for s in stage2.data] == ["pairs"] and stage2.data[0].dataset is None  # no Pick-a-Pic mixing
    assert stage2.init_from == f"data/finetune/{stage1.name}" and stage2.reference == "init"  # the default output dir
    for cfg in (stage1, stage2):  # the reference launchers' settings
        assert (cfg.model, cfg.mode, cfg.beta, cfg.effective_batch_size, cfg.max_train_steps, cfg.lr_warmup_steps) == \
            ("stable-diffusion-v1-5/stable-diffusion-v1-5", "full", 5000, 2048, 2000, 500)
        assert cfg.learning_rate_for(8) == pytest.approx(2.048e-5)
    mixing = (REPO / "configs" / "finetune-sd15-dpo.yaml").read_text()
    assert "NOT RPO's recipe" in mixing
    readme = (REPO / "README.md").read_text()
    assert re.search(r"--config finetune-sd15-dpo-pickapic100k.*\n.*--config finetune-sd15-rpo --pairs", readme)
    for f in REPO.glob("configs/*.yaml"):  # every config says what it is
        assert f.read_text().startswith("# "), f


def test_every_tuned_model_an_evaluate_config_names_is_where_a_finetune_config_writes():
    """`richpref finetune --config X` writes to <data>/finetune/<X's name>; an evaluate config's tuned
    model must name that folder, or `richpref evaluate` after the finetune finds no model."""
    from richpref.schemas.training import load_evaluate_config, load_finetune_config
    from richpref.training.finetune import default_output_dir

    written = {default_output_dir(load_finetune_config(str(f)), "") for f in REPO.glob("configs/finetune-*.yaml")}
    named = [(f.name, m.path) for f in sorted(REPO.glob("configs/evaluate-*.yaml"))
             for m in load_evaluate_config(str(f)).models if m.path.startswith("finetune/")]
    assert len(named) >= 7  # every evaluate config compares a base with its tuned model
    assert [n for n in named if n[1] not in written] == []


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen-image"])
def test_the_tiny_flow_configs_train_on_the_text_length_their_profile_and_evaluation_sample_with(family):
    # before: finetune-tiny-* trained on 32 tokens, and tiny-* and evaluate-tiny-* sampled with 64
    from richpref.schemas.config import load_profile
    from richpref.schemas.training import load_evaluate_config, load_finetune_config

    trained = load_finetune_config(f"finetune-tiny-{family}").flow.max_sequence_length
    assert trained == load_profile(f"tiny-{family}").sample.max_sequence_length
    assert trained == load_evaluate_config(f"evaluate-tiny-{family}").max_sequence_length
