"""Images/s of the sample and edit backends vs batch size, on the tiny SD1.5 and SDXL models.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/image_stages.py [--n 16] [--steps 4] [--size 64] [--repeats 2]

Each figure is `n` images generated (or edited) in batches of 1, 4 and 16, after one warm-up batch,
the best of `repeats` timings (the machine is shared: the best run is the least disturbed). Models
are built into a temporary directory unless --models-root points at a tiny build.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from timing import best_of, scene  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="images per timing")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models-root", default=None, help="an existing tiny build (richpref models build-tiny)")
    args = ap.parse_args()

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

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    n, size = args.n, args.size
    prompts = [f"a photo of object number {i} on a table" for i in range(n)]
    seeds = list(range(n))
    originals = [scene(i, size) for i in range(n)]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"n={n} images of {size}x{size}, {args.steps} steps, best of {args.repeats}")
    print(f"{'model':6} {'stage':7} " + " ".join(f"{'bs=' + str(b):>10}" for b in batch_sizes) + "   (images/s)")
    for name, (base, controlnet) in models.items():
        gen = TextToImage.load(base, device="cpu", dtype="float32")
        run = lambda b: gen.generate(prompts, seeds, steps=args.steps, guidance_scale=5.0,  # noqa: E731
                                     height=size, width=size, batch_size=b)
        gen.generate(prompts[:1], seeds[:1], steps=args.steps, guidance_scale=5.0, height=size, width=size)
        rates = [n / best_of(args.repeats, lambda: run(b), warmup=False) for b in batch_sizes]
        print(f"{name:6} {'sample':7} " + " ".join(f"{r:10.1f}" for r in rates), flush=True)
        gen.close()

        ed = ControlNetEditor.load(base, controlnet, device="cpu", dtype="float32", control="canny")
        run = lambda b: ed.edit(originals, prompts, seeds, steps=args.steps, strength=0.75, batch_size=b)  # noqa: E731
        ed.edit(originals[:1], prompts[:1], seeds[:1], steps=args.steps)
        rates = [n / best_of(args.repeats, lambda: run(b), warmup=False) for b in batch_sizes]
        print(f"{name:6} {'edit':7} " + " ".join(f"{r:10.1f}" for r in rates), flush=True)
        ed.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
