"""Image encodings per pair in the filter stage, measured: a forward hook on the VLM's vision tower
counts the images it really encodes while `filter_rows` runs on the tiny Qwen2.5-VL.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/filter_encodings.py --models-root MODELS [--pairs 8] [--attributes 5|model] [--repeats 3]

Sides, alternated, each a fresh process (bench/harness.py):
  plain    `check.share_image_prefix: false`: every yes/no question sends its image through the tower
  shared   `check.share_image_prefix: true` (the default): each image's prefix is encoded once and its
           questions' suffixes run on the cached keys/values
Both with the tiny profile's questions: 2 instructions per pair and `--attributes` attribute
questions per image (default 5, the workload the goal was set for). The tiny model still writes its
attribute list from the original cut-out (that generation is measured too), but its random words are
then replaced by N fixed ones, the same on both sides; `--attributes model` keeps what it wrote (about
1.5 a pair, so fewer questions share each encoded image).
Headline: images encoded per pair, plain / shared (goal >= 3). What a prefix-caching server (vLLM,
SGLang) would encode is not measured here (no such server on this machine): bench/served_vlm.py
calculates it from the rendered prompts, and the doc labels that figure as calculated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tower(model):
    """The vision tower module (Qwen2.5-VL: `visual`; LLaVA: `vision_tower`)."""
    for name, mod in model.named_modules():
        if name.split(".")[-1] in ("visual", "vision_tower", "vision_model"):
            return mod
    raise RuntimeError("no vision tower found in the VLM")


def child(a) -> None:
    import torch
    from vlm_stages import PROMPTS, _png

    from richpref.models.tiny import LAYOUT
    from richpref.models.vlm import VisionLanguageModel
    from richpref.schemas.config import CheckConfig, FilterConfig
    from richpref.tasks import filter as filter_stage

    import pyarrow as pa

    torch.set_num_threads(1)
    vlm = VisionLanguageModel.load(str(Path(a.models_root) / LAYOUT["vlm"]), device="cpu")
    seen = {"calls": 0, "images": 0}

    def hook(module, args, kwargs):
        seen["calls"] += 1
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        seen["images"] += int(grid.shape[0]) if grid is not None and hasattr(grid, "shape") else 1

    _tower(vlm.model).register_forward_pre_hook(hook, with_kwargs=True)
    if a.attributes != "model":  # the model's generation runs (and is counted); its list is a fixed one
        from richpref.tasks import check as check_stage

        listed_by_model = check_stage.attribute_lists
        fixed = [f"attribute {j}" for j in range(int(a.attributes))]
        check_stage.attribute_lists = lambda *args: {iid: (list(fixed), raw, None)
                                                      for iid, (_, raw, _) in listed_by_model(*args).items()}
    n = a.pairs
    ids = [f"item{k:04d}" for k in range(n)]
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(n)]
    images = {"original": [_png(k) for k in range(n)], "edited": [_png(1000 + k) for k in range(n)],
              "original_cutout": [_png(2000 + k) for k in range(n)], "edited_cutout": [_png(3000 + k) for k in range(n)]}
    instructions = [["Change the colour of the main object", "Remove the extra object on the left"]] * n
    check = CheckConfig(max_new_tokens=24, batch_size=8, share_image_prefix=a.side == "shared")
    cfg = FilterConfig(min_attribute_present=0.517, min_attributes_kept=0.5)
    pairs = pa.table({"item_id": ids, "candidate": [0] * n})
    t0 = time.perf_counter()
    filter_stage.filter_rows(pairs, prompts, instructions, images, check, cfg, lambda: vlm)
    wall = time.perf_counter() - t0
    print("RESULT " + json.dumps({"encoder_calls": seen["calls"], "images_encoded": seen["images"],
                                  "images_per_pair": seen["images"] / n, "filter_s": wall}), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models-root", default=os.environ.get("RICHPREF_MODELS_ROOT", "data/models/tiny"))
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--attributes", default="5", help="attribute questions per image, or `model`: what the tiny model lists")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--side", choices=["plain", "shared"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:
        return child(a)
    import harness

    def side(b: harness.Bench, name: str, rep: int) -> dict:
        root, env = b.fresh(f"{name}{rep}", OMP_NUM_THREADS="1")
        r = harness.run_process([sys.executable, __file__, "--side", name, "--models-root", a.models_root,
                                 "--pairs", str(a.pairs), "--attributes", a.attributes], env, timeout=3600)
        assert r["rc"] == 0, r["stderr"][-3000:]
        return {**harness.child_result(r["stdout"]), "process_wall_s": r["wall_s"]}

    harness.run("filter_encodings", a.repeats, ["plain", "shared"], "fewer_encodings", "x", ">= 3", side=side,
                extra_runs=lambda runs: harness.ratios(runs, ("plain", "images_per_pair"), ("shared", "images_per_pair"),
                                                       "fewer_encodings"),
                kind="measured",
                note=f"images through the vision tower per pair (forward hook), share_image_prefix off / on, "
                     f"{a.pairs} pairs, 2 instructions and "
                     + ("the attributes the tiny model lists" if a.attributes == "model" else f"{a.attributes} attributes")
                     + " per pair, tiny Qwen2.5-VL in process; a prefix-caching server's count is "
                     "calculated, not measured (bench/served_vlm.py)")


if __name__ == "__main__":
    main()
