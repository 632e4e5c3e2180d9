"""What the dataset cards share: the Hub front matter, reward titles and the usage snippet."""
from __future__ import annotations

import copy
import json

from richpref.schemas.migrate import migrate
from richpref.schemas.reward_titles import reward_titles  # noqa: F401 - the cards' names for rewards

PLOTS_DIR = "plots"  # beside the card, in the pairs folder: the card's links are relative
HUB_FILES = ("part-*.parquet", "README.md", f"{PLOTS_DIR}/*.png")  # what a push uploads of the pairs folder


def write_card(fs, folder: str, card: str, plots: dict[str, bytes]) -> dict[str, str]:
    """A card (README.md) and its plots (plots/NAME.png) into one pairs folder of filesystem `fs`;
    returns each one's path, the card last."""
    fs.makedirs(f"{folder}/{PLOTS_DIR}", exist_ok=True)
    out = {}
    for name, png in plots.items():
        out[name] = f"{folder}/{PLOTS_DIR}/{name}"
        fs.pipe_file(out[name], png)
    out["README.md"] = f"{folder}/README.md"
    fs.pipe_file(out["README.md"], card.encode())
    return out


def counts_table(stages: list[dict]) -> list[str]:
    """The card's "Counts" section: one row per stage, its kept and rejected rows and why."""
    lines = ["## Counts", "", "| stage | rows | kept | rejected | reject reasons |", "|---|---|---|---|---|"]
    for st in stages:
        reasons = ", ".join(f"{k}: {v}" for k, v in st["reasons"].items()) or "–"
        lines.append(f"| {st['stage']} | {st['rows']} | {st['kept']} | {st['rejected']} | {reasons} |")
    return lines


def votes(profile: dict) -> tuple[dict[str, dict], dict[str, float], dict | None, float]:
    """From a run's saved profile (of this layout or the previous one): the scored rewards' specs
    (score.rewards), each one's weight (0: recorded without a vote), the subject gate's model
    settings (score.subject_gate) and its threshold (relabel.min_consistency)."""
    data = copy.deepcopy(profile)
    migrate(data, "run profile")
    score, relabel = data.get("score") or {}, data.get("relabel") or {}
    rewards = score.get("rewards") or {"imagereward": {"kind": "imagereward"}}
    given = relabel.get("weights")
    weights = {n: 1.0 if given is None else float(given.get(n, 0.0)) for n in rewards}
    return rewards, weights, score.get("subject_gate"), relabel.get("min_consistency", 0.0)


def _front_matter(title: str) -> list[str]:
    return ["---", "configs:", "- config_name: default", "  data_files:", "  - split: train", '    path: "part-*.parquet"',
            "task_categories:", "- text-to-image", "tags:", "- preference", "- dpo", "- pick-a-pic-format", "- richpref",
            f"pretty_name: {json.dumps(title)}", "---", ""]


USAGE = """```python
import io, datasets
from PIL import Image
ds = datasets.load_dataset("parquet", data_files="part-*.parquet", split="train")
row = ds[0]
chosen, rejected = ("jpg_0", "jpg_1") if row["label_0"] == 1 else ("jpg_1", "jpg_0")
Image.open(io.BytesIO(row[chosen]))   # exactly how the Diffusion-DPO training scripts read it
```"""
