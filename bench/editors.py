"""Images/s of each editor (`edit.kind`) on its tiny model, at batch 1 and 8.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/editors.py [--n 16] [--size 64] [--repeats 2]

Each editor runs with the edit settings of its tiny profile (configs/tiny*.yaml: 4 steps; ControlNet
img2img at strength 0.75 runs 3 of them) on `n` 64 px images, after one warm-up batch; each figure is
the best of `repeats` timings (the machine is shared: the best run is the least disturbed). The tiny
models are random and a few MB: the figures compare the pipelines' overheads, not the real models'
cost (docs/benchmarks.md estimates that from public figures). Models are built into a temporary
directory unless --models-root points at a tiny build (richpref models build-tiny).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from timing import best_of, scene  # noqa: E402

PROFILES = {
    "controlnet_img2img": "tiny",
    "instruct_pix2pix": "tiny-instruct-pix2pix",
    "instruct_pix2pix (SDXL)": "tiny-sdxl-instruct-pix2pix",
    "flux_kontext": "tiny-flux-kontext",
    "qwen_image_edit": "tiny-qwen-image-edit",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="images per timing")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models-root", default=None, help="an existing tiny build (richpref models build-tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    ap.add_argument("--editors", default=",".join(PROFILES), help="a comma-separated subset of: " + ", ".join(PROFILES))
    args = ap.parse_args()

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

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    n, size = args.n, args.size
    prompts = [f"a photo of object number {i} on a table, make it blue" for i in range(n)]
    seeds = list(range(n))
    originals = [scene(i, size) for i in range(n)]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"n={n} images of {size}x{size}, best of {args.repeats}")
    print(f"# device {args.device}, {args.dtype}")
    print(f"{'editor':24} " + " ".join(f"{'bs=' + str(b):>8}" for b in batch_sizes) + "   (images/s)  same seeds, same images")
    for name in args.editors.split(","):
        cfg = load_profile(PROFILES[name], [f"edit.device={args.device}", f"edit.dtype={args.dtype}"]).edit
        editor = load_editor(cfg, root)
        settings = editor_settings(cfg)
        first = editor.edit(originals[:4], prompts[:4], seeds[:4], batch_size=4, **settings)
        again = editor.edit(originals[:4], prompts[:4], seeds[:4], batch_size=4, **settings)
        same = all(a.tobytes() == b.tobytes() for a, b in zip(first, again))
        rates = [n / best_of(args.repeats, lambda: editor.edit(originals, prompts, seeds, batch_size=b, **settings),
                             warmup=False) for b in batch_sizes]
        print(f"{name:24} " + " ".join(f"{r:8.1f}" for r in rates) + f"   {'yes' if same else 'NO'}", flush=True)
        resident.release()
    tmp.cleanup()


if __name__ == "__main__":
    main()
