"""Images/s of each editor (`edit.kind`) on its tiny model, at batch 1 and 8.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/editors.py [--n 16] [--size 64] [--repeats 3]

Each editor runs with the edit settings of its tiny profile (configs/tiny*.yaml: 4 steps; ControlNet
img2img at strength 0.75 runs 3 of them) on `n` 64 px images, after one warm-up batch. On the harness:
each repeat a fresh process that loads each editor once, then times one call per batch size in
alternated order; raw runs go to bench/results/editors-<commit>.json. The tiny
models are random and a few MB: the figures compare the pipelines' overheads, not the real models'
cost (docs/benchmarks.md estimates that from public figures). Models are built into a temporary
directory unless --models-root points at a tiny build (richpref models build-tiny).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import harness  # noqa: E402
from timing import scene  # noqa: E402

PROFILES = {
    "controlnet_img2img": "tiny",
    "instruct_pix2pix": "tiny-instruct-pix2pix",
    "instruct_pix2pix (SDXL)": "tiny-sdxl-instruct-pix2pix",
    "flux_kontext": "tiny-flux-kontext",
    "qwen_image_edit": "tiny-qwen-image-edit",
}


def child(args) -> None:
    from richpref.models.editor import editor_settings, load_editor
    from richpref.models.runtime import resident
    from richpref.schemas.config import load_profile

    tmp = tempfile.TemporaryDirectory(prefix="richpref-bench-")
    root = args.models_root
    if root is None:
        from richpref.models.tiny import EDITOR_TWINS, build_twins
        from richpref.models.tiny.diffusion import build_tiny_controlnet, build_tiny_sd15

        root = tmp.name
        build_tiny_controlnet(build_tiny_sd15(f"{root}/sd15"), f"{root}/controlnet-canny", seed=1)
        build_twins(root, EDITOR_TWINS)
    n, size = args.n, args.size
    prompts = [f"a photo of object number {i} on a table, make it blue" for i in range(n)]
    seeds = list(range(n))
    originals = [scene(i, size) for i in range(n)]
    out: dict[str, dict] = {s: {} for s in args.order}
    out["same_seeds"] = {}
    for name in args.editors.split(","):
        cfg = load_profile(PROFILES[name], [f"edit.device={args.device}", f"edit.dtype={args.dtype}"]).edit
        editor = load_editor(cfg, root)
        settings = editor_settings(cfg)
        first = editor.edit(originals[:4], prompts[:4], seeds[:4], batch_size=4, **settings)  # also the warm-up
        again = editor.edit(originals[:4], prompts[:4], seeds[:4], batch_size=4, **settings)
        key = name.replace(" ", "_").replace("(", "").replace(")", "")
        out["same_seeds"][f"{key}.same_images"] = float(all(a.tobytes() == b.tobytes() for a, b in zip(first, again)))
        for side in args.order:
            t0 = time.perf_counter()
            editor.edit(originals, prompts, seeds, batch_size=int(side[1:]), **settings)
            out[side][f"{key}.images_per_s"] = n / (time.perf_counter() - t0)
        resident.release()
    tmp.cleanup()
    harness.print_child("RESULT ", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="images per timing")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--models-root", default=None, help="an existing tiny build (richpref models build-tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    ap.add_argument("--editors", default=",".join(PROFILES), help="a comma-separated subset of: " + ", ".join(PROFILES))
    args = harness.child_args(ap, repeats=3).parse_args()
    if args.child:
        return child(args)
    sides = [f"b{int(x)}" for x in args.batch_sizes.split(",")]
    harness.run("editors", args.repeats, sides, "worst_speedup", "x", script=__file__, args=harness.child_argv(sys.argv[1:]),
                derive=lambda res: {**harness.rate_ratios(res, sides, "images_per_s"), **res["same_seeds"]},
                note=f"images/s at batch {sides[-1][1:]} / batch {sides[0][1:]}, the smallest over the "
                     f"editors ({args.editors}); {args.n} images of {args.size}x{args.size}, each editor's "
                     f"tiny profile settings, device {args.device}, {args.dtype}; `same_images` = 1 when "
                     f"the same seeds gave the same images")


if __name__ == "__main__":
    main()
