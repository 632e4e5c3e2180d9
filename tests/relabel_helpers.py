"""Reward stand-ins and the mini run, shared by the score, relabel and export tests (tests/tasks/),
tests/scenarios/test_flip_rate.py and tests/recipes/test_relabel_dataset.py: a deterministic channel-mean reward,
solid test images, shard 0 of every stage before the reward scores written by hand, and the mini
run that scores, relabels and exports it through the real stages (the `mini_run` fixture in
tests/conftest.py). Not a test module."""
from __future__ import annotations

import numpy as np
from PIL import Image

from richpref.common.images import encode_png
from richpref.run.runner import content_key, run_shard, write_shard
from richpref.schemas.config import load_profile
from richpref.schemas.tables import CHECKS, CRITIQUES, CUTOUTS, EDITS, INSTRUCTIONS, PROMPTS, SAMPLES, VERDICTS, rows_to_table
from richpref.run.storage import RunStore
from richpref.tasks import export as export_stage
from richpref.tasks import relabel as relabel_stage
from richpref.tasks import score as score_stage


class ChannelValue:
    """A deterministic reward: the mean of one colour channel (solid test images make it exact)."""

    def __init__(self, channel: int) -> None:
        self.channel, self.model_id = channel, f"channel-{channel}"

    def score(self, images, prompts, *, batch_size=8):
        return np.array([np.asarray(im, dtype=np.float64)[..., self.channel].mean() for im in images])


def solid(r, g, b=0):
    return encode_png(Image.new("RGB", (16, 16), (r, g, b)))


N_ITEMS = 6
PROMPT_TEXT = ["a red bicycle", "three green apples", "a cat in a box", "an astronaut on a horse", "a blue teapot", "a lighthouse"]


def _image(rng, size=64):
    base = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))
    return Image.fromarray(np.clip(base + rng.integers(0, 60, (size, size, 3)), 0, 255).astype(np.uint8))


def write_upstream(store: RunStore) -> dict:
    """Shard 0 of every stage before the reward scores, with one item dropped by the filter."""
    rng = np.random.default_rng(11)
    ids = [f"item{k}" for k in range(N_ITEMS)]
    originals = [_image(rng) for _ in ids]
    edits = [Image.fromarray(np.clip(np.asarray(o, dtype=int) + rng.integers(-50, 50, (64, 64, 3)), 0, 255).astype(np.uint8))
             for o in originals]
    cut = lambda im: encode_png(Image.fromarray(np.where(np.arange(64)[None, :, None] < 32, np.asarray(im), 255).astype(np.uint8)))  # noqa: E731
    ok = {"status": "ok", "reason": None}
    tables = {
        "source": rows_to_table([{"item_id": i, **ok, "source": "test", "source_row": k, "prompt": PROMPT_TEXT[k]}
                                 for k, i in enumerate(ids)], PROMPTS),
        "sample": rows_to_table([{"item_id": i, **ok, "prompt": PROMPT_TEXT[k], "image": encode_png(originals[k]), "width": 64,
                                  "height": 64, "seed": k, "origin": "generated", "model_id": "sd15"} for k, i in enumerate(ids)], SAMPLES),
        "critique": rows_to_table([{"item_id": i, **ok, "prompt": PROMPT_TEXT[k], "critique": f"critique {k}", "model_id": "critic"}
                                   for k, i in enumerate(ids)], CRITIQUES),
        "instruct": rows_to_table([{"item_id": i, **ok, "prompt": PROMPT_TEXT[k], "instructions": [f"fix {k}"], "model_id": "vlm"}
                                   for k, i in enumerate(ids)], INSTRUCTIONS),
        "edit": rows_to_table([{"item_id": i, **ok, "candidate": 0, "edit_prompt": f"{PROMPT_TEXT[k]}, fix {k}", "image": encode_png(edits[k]),
                                "width": 64, "height": 64, "seed": k, "model_id": "editor"} for k, i in enumerate(ids)], EDITS),
        "cutout": rows_to_table([{"item_id": i, **ok, "candidate": 0, "original_cutout": cut(originals[k]), "edited_cutout": cut(edits[k]),
                                  "model_id": "u2net"} for k, i in enumerate(ids)], CUTOUTS),
        "check": rows_to_table([{"item_id": i, **ok, "candidate": 0} for i in ids], CHECKS),
        "filter": rows_to_table([{"item_id": i, "candidate": 0, "status": "rejected" if k == 2 else "ok",
                                  "reason": "filter: not_executed(p_yes=0.10 < 0.5)" if k == 2 else None,
                                  "verdict": "drop" if k == 2 else "keep"} for k, i in enumerate(ids)], VERDICTS),
    }
    return {name: write_shard(store, name, 0, t, key=f"test-{name}") for name, t in tables.items()}


def run_stage(stage, store, profile, manifests):
    inputs = {r: manifests[r] for r in stage.reads}
    manifests[stage.out] = run_shard(stage, 0, inputs, store, profile, content_key(stage, profile, 0, inputs))


def build_mini_run(tiny_models, tmp_path_factory):
    """The `mini_run` fixture's body (tests/conftest.py): (data dir, store, profile) of run "mini"."""
    data = tmp_path_factory.mktemp("runs")
    store = RunStore(str(data), "mini")
    profile = load_profile("tiny", models_root=str(tiny_models))
    store.write_text("profile.json", profile.model_dump_json(indent=2))
    manifests = write_upstream(store)
    run_stage(score_stage.STAGE, store, profile, manifests)
    run_stage(relabel_stage.STAGE, store, profile, manifests)
    run_stage(export_stage.STAGE, store, profile, manifests)
    return data, store, profile


def _flip_rate(relabel_rows: list[dict]) -> float:
    """The product's flip rate: of the kept pairs that hold the original (candidate_0 = −1), the share
    where the edit scored lower. Ties and other rejects are not pairs; pairs of two edits cannot flip."""
    with_original = [r for r in relabel_rows if r["status"] == "ok" and r.get("candidate_0") in (None, -1)]
    return sum(bool(r["flipped"]) for r in with_original) / len(with_original)


def card_images_uploaded(card_path) -> list[str]:
    """The card's image links; each must be a file beside it that a push to the Hub uploads (HUB_FILES)."""
    import re
    from fnmatch import fnmatch
    from pathlib import Path

    from richpref.views.card_parts import HUB_FILES

    folder = Path(card_path).parent
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", Path(card_path).read_text(encoding="utf-8"))
    assert links, "the card shows no image"
    for link in links:
        assert (folder / link).is_file(), f"{link}: no such file beside the card"
        assert any(fnmatch(link, pattern) for pattern in HUB_FILES), f"{link}: not uploaded with the card"
    return links
