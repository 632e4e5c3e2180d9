"""Images/s of the sample and edit backends vs batch size, on the tiny SD1.5 and SDXL models.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/image_stages.py [--n 16] [--steps 4] [--size 64] [--batch-sizes 1,4,16]
        [--models sd15,sdxl] [--repeats 3]

Each figure is `n` images generated (or edited) in batches of 1, 4 and 16, after one warm-up batch. On
the harness: each repeat a fresh process that loads each pipeline once, then times one call per batch
size in alternated order; raw runs go to bench/results/image_stages-<commit>.json. Headline: the
smallest speedup of the largest batch over batch 1 (no goal). Models are built into a temporary
directory unless --models-root points at a tiny build.
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


def child(args) -> None:
    from richpref.models.editor import ControlNetEditor
    from richpref.models.generator import TextToImage
    from richpref.models.tiny.diffusion import (
        build_tiny_controlnet,
        build_tiny_sd15,
        build_tiny_sdxl,
        build_tiny_sdxl_controlnet,
    )

    tmp = tempfile.TemporaryDirectory(prefix="richpref-bench-")
    if args.models_root:
        root = args.models_root
        models = {"sd15": (f"{root}/sd15", f"{root}/controlnet-canny"), "sdxl": (f"{root}/sdxl", f"{root}/controlnet-sdxl")}
    else:
        sd = build_tiny_sd15(f"{tmp.name}/sd15")
        xl = build_tiny_sdxl(f"{tmp.name}/sdxl", seed=7)
        models = {
            "sd15": (str(sd), str(build_tiny_controlnet(sd, f"{tmp.name}/cn", seed=1))),
            "sdxl": (str(xl), str(build_tiny_sdxl_controlnet(xl, f"{tmp.name}/cnxl", seed=8))),
        }
    models = {k: v for k, v in models.items() if k in args.models.split(",")}
    n, size = args.n, args.size
    prompts = [f"a photo of object number {i} on a table" for i in range(n)]
    seeds = list(range(n))
    originals = [scene(i, size) for i in range(n)]
    out: dict[str, dict] = {s: {} for s in args.order}

    def timed(name: str, run) -> None:
        for side in args.order:
            t0 = time.perf_counter()
            run(int(side[1:]))
            out[side][f"{name}.images_per_s"] = n / (time.perf_counter() - t0)

    for name, (base, controlnet) in models.items():
        gen = TextToImage.load(base, device="cpu", dtype="float32")
        gen.generate(prompts[:1], seeds[:1], steps=args.steps, guidance_scale=5.0, height=size, width=size)
        timed(f"{name}.sample", lambda b: gen.generate(prompts, seeds, steps=args.steps, guidance_scale=5.0,
                                                       height=size, width=size, batch_size=b))
        gen.close()
        ed = ControlNetEditor.load(base, controlnet, device="cpu", dtype="float32", control="canny")
        ed.edit(originals[:1], prompts[:1], seeds[:1], steps=args.steps)
        timed(f"{name}.edit", lambda b: ed.edit(originals, prompts, seeds, steps=args.steps, strength=0.75, batch_size=b))
        ed.close()
    tmp.cleanup()
    harness.print_child("RESULT ", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="images per timing")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--models-root", default=None, help="an existing tiny build (richpref models build-tiny)")
    ap.add_argument("--models", default="sd15,sdxl", help="a comma-separated subset of: sd15, sdxl")
    args = harness.child_args(ap, repeats=3).parse_args()
    if args.child:
        return child(args)
    sides = [f"b{int(x)}" for x in args.batch_sizes.split(",")]
    harness.run("image_stages", args.repeats, sides, "worst_speedup", "x", script=__file__,
                args=harness.child_argv(sys.argv[1:]), derive=lambda res: harness.rate_ratios(res, sides, "images_per_s"),
                note=f"images/s at batch {sides[-1][1:]} / batch {sides[0][1:]}, the smallest of sample and "
                     f"ControlNet edit on the tiny {args.models}; {args.n} images of {args.size}x{args.size}, "
                     f"{args.steps} steps, one timed call per batch size after a warm-up")


if __name__ == "__main__":
    main()
