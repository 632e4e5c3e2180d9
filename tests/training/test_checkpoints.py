"""FSDP's save path on CPU: accelerate (1.16) shards on GPUs only (docs/operations.md, FSDP), but torch's own
fully_shard runs on CPU over gloo, so the gather-and-save of the tuned weights is tested here on a
sharded tiny FLUX.1 transformer in 2 processes."""
from __future__ import annotations

import multiprocessing

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from fsdp_worker import main as worker



def test_sharded_full_finetune_saves_the_whole_transformer(paths, tmp_path):
    # spawned, not forked: a fork of a process whose autograd threads already ran (an earlier training test
    # in the same pytest worker) fails in the child's backward
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(rank, 2, str(paths.flux), str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]

    base = FluxTransformer2DModel.from_pretrained(paths.flux, subfolder="transformer")
    tuned = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")  # every weight, whole, not rank 0's shard
    base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
    assert tuned_sd.keys() == base_sd.keys()
    assert all(tuned_sd[k].shape == v.shape for k, v in base_sd.items())
    changed = [k for k, v in base_sd.items() if not torch.equal(tuned_sd[k], v)]
    assert len(changed) > len(base_sd) // 2
    pipe = FluxPipeline.from_pretrained(paths.flux, transformer=tuned)
    image = pipe("a red cube", height=32, width=32, num_inference_steps=1, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and float(abs(image).sum()) > 0
