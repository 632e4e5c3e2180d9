"""Settings meant to reproduce published numbers: the checkpoints and versions the papers used."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_no_profile_or_default_names_the_removed_sd15_repo():
    from richpref.schemas.config import EditConfig, SampleConfig
    from richpref.schemas.training import FinetuneConfig

    removed = "runwayml/stable-diffusion-v1-5"  # taken off the Hub; the copy lives under the org below
    for f in [*REPO.glob("configs/*.yaml"), REPO / "README.md", *REPO.glob("docs/*.md")]:
        assert removed not in f.read_text(encoding="utf-8"), f
    assert SampleConfig().model == EditConfig().model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert FinetuneConfig.model_fields["model"].default == "stable-diffusion-v1-5/stable-diffusion-v1-5"
