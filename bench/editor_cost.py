"""Seconds per edit of each real editor's denoiser at its real size, on a GPU, without its weights.

    python bench/editor_cost.py [--passes 5] [--repeats 3] [--batch 1]

Each editor's denoising network is built from its real architecture (diffusers' classes at the
published checkpoints' sizes) with random weights in bfloat16, fed inputs of the real shapes at the
editor profile's working size, and timed per forward pass (mean of `passes` after two warm-ups). On the
harness: each repeat a fresh process timing every editor, in alternated order; raw figures in
bench/results/editor_cost-<commit>.json.
Seconds per edit = steps × passes per step × seconds per pass ÷ batch: the denoiser dominates an
edit's cost; the text encoders (once per edit) and the VAE (twice) are left out, so these are lower
bounds. Random weights cost the same FLOPs as trained ones. Shapes (profile defaults):

- controlnet_img2img (SD1.5 + ControlNet, 512 px, 20 steps × strength 0.75 = 15, CFG: batch ×2)
- instruct_pix2pix (SD1.5 UNet with 8 input channels, 512 px, 20 steps, text + image CFG: batch ×3)
- flux_kontext (12B Flux, 1024 px: 4096 noise + 4096 context tokens, 512 T5 tokens, 28 steps, 1 pass)
- qwen_image_edit (20B Qwen-Image MMDiT, 1024 px: 4096 + 4096 tokens, ~1350 VLM tokens, 50 steps, 2 passes)
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

import harness


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - t0) / repeats


def sd15_unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    # SD 1.5's UNet config (stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json).
    return UNet2DConditionModel(sample_size=64, in_channels=in_channels, out_channels=4, cross_attention_dim=768,
                                attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)


def controlnet_img2img(batch: int, repeats: int) -> tuple[float, int]:
    from diffusers import ControlNetModel

    unet = sd15_unet(4)
    controlnet = ControlNetModel.from_unet(unet)
    b = 2 * batch
    x, text = torch.randn(b, 4, 64, 64), torch.randn(b, 77, 768)
    cond, t = torch.randn(b, 3, 512, 512), torch.full((b,), 500)

    def step():
        down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
             mid_block_additional_residual=mid, return_dict=False)

    return _time(step, repeats), 15


def instruct_pix2pix(batch: int, repeats: int) -> tuple[float, int]:
    unet = sd15_unet(8)
    b = 3 * batch
    x, text, t = torch.randn(b, 8, 64, 64), torch.randn(b, 77, 768), torch.full((b,), 500)
    return _time(lambda: unet(x, t, encoder_hidden_states=text, return_dict=False), repeats), 20


def flux_kontext(batch: int, repeats: int) -> tuple[float, int]:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(guidance_embeds=True)  # FLUX.1 [dev] / Kontext [dev] sizes
    tokens = 2 * 64 * 64  # the noise and the context image, 1024 px / 8 (VAE) / 2 (patches), squared
    x, text = torch.randn(batch, tokens, 64), torch.randn(batch, 512, 4096)
    pooled, t, g = torch.randn(batch, 768), torch.full((batch,), 0.5), torch.full((batch,), 2.5)
    img_ids, txt_ids = torch.zeros(tokens, 3), torch.zeros(512, 3)
    call = lambda: model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,  # noqa: E731
                         img_ids=img_ids, txt_ids=txt_ids, guidance=g, return_dict=False)
    return _time(call, repeats), 28


def qwen_image_edit(batch: int, repeats: int) -> tuple[float, int]:
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel()  # Qwen-Image / Qwen-Image-Edit sizes
    text_tokens = 1350  # Qwen2.5-VL's tokens for a 1024 px image (~1370) + the instruction, minus the 64 dropped
    x, text = torch.randn(batch, 2 * 64 * 64, 64), torch.randn(batch, text_tokens, 3584)
    mask, t = torch.ones(batch, text_tokens, dtype=torch.long), torch.full((batch,), 0.5)
    shapes = [[(1, 64, 64), (1, 64, 64)]] * batch
    call = lambda: model(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=mask,  # noqa: E731
                         timestep=t, img_shapes=shapes, return_dict=False)
    return _time(call, repeats), 2 * 50  # true CFG: a conditional and an unconditional pass per step


EDITORS = {"controlnet_img2img": controlnet_img2img, "instruct_pix2pix": instruct_pix2pix,
           "flux_kontext": flux_kontext, "qwen_image_edit": qwen_image_edit}


def child(args) -> None:
    out: dict[str, dict] = {}
    for name in args.order:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(args.device), torch.inference_mode():
            per_pass, passes = EDITORS[name](args.batch, args.passes)
        torch.set_default_dtype(torch.float32)
        per_edit = per_pass * passes / args.batch
        out[name] = {"s_per_pass": per_pass, "passes": passes, "s_per_edit": per_edit,
                     "gpu_h_per_100k": per_edit * 1e5 / 3600}
        print(f"{name:20} {per_pass:8.3f} {passes:7d} {per_edit:8.2f} {per_edit * 1e5 / 3600:11.1f}", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    harness.print_child("RESULT ", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=5, help="timed forward passes per editor (after two warm-ups)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--editors", default=",".join(EDITORS))
    ap.add_argument("--device", default="cuda")
    args = harness.child_args(ap, repeats=3).parse_args()
    if args.child:
        return child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("editor_cost needs a CUDA GPU (--device cuda): the real editors' denoisers at their real sizes")
    names = args.editors.split(",")
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    # the headline: the costliest editor
    harness.run("editor_cost", args.repeats, names,
                lambda s: max((f"{n}.gpu_h_per_100k" for n in names), key=lambda k: s[k]["median"]),
                "GPU-h per 100k edits", script=__file__, args=harness.child_argv(sys.argv[1:]),
                note=f"{where}, bfloat16, batch {args.batch}: seconds per edit of each editor's "
                     f"denoiser at its real size (steps x passes x s/pass, mean of {args.passes} "
                     f"passes after 2 warm-ups), the costliest editor as headline; each repeat a "
                     f"fresh process, editors in alternated order")


if __name__ == "__main__":
    main()
