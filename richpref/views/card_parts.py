"""What the dataset cards share: the Hub front matter, reward titles and the usage snippet."""
from __future__ import annotations

import json

from richpref.schemas.reward_titles import reward_titles  # noqa: F401 - the cards' names for rewards


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
