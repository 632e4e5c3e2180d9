"""One process of tests/training/test_checkpoints.py (forked by it, gloo on CPU): the tiny FLUX.1
transformer sharded with torch's fully_shard over the processes, gradient checkpointing on, a few full
fine-tune steps, then the whole weights gathered (richpref.training.checkpoints.full_state_dict) and
saved by richpref.training.models.save_tuned on the main process."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from richpref.schemas.training import FinetuneConfig
from richpref.training.checkpoints import full_state_dict, param_norm
from richpref.training.models import save_tuned


def main(rank: int, world: int, model_dir: str, out: str, steps: int = 2) -> None:
    torch.set_num_threads(1)
    # A file store, not rank 0's TCP store: rank 0 could exit, taking its store server with it, while
    # rank 1 was still tearing its group down, which then aborted (exit -6, once in a full suite).
    dist.init_process_group("gloo", init_method=f"file://{Path(out) / 'process-group-store'}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    model.enable_gradient_checkpointing()
    model.train()
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(p.to_local().numel() < p.numel() for p in model.parameters() if p.numel() >= 2 * mesh.size())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    c = model.config
    g = torch.Generator().manual_seed(rank)  # each process its own batch, as data parallelism does
    for _ in range(steps):
        pred = model(hidden_states=torch.randn(1, 16, c.in_channels, generator=g),
                     encoder_hidden_states=torch.randn(1, 8, c.joint_attention_dim, generator=g),
                     pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                     timestep=torch.rand(1, generator=g), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                     guidance=torch.full((1,), 3.5), return_dict=False)[0]
        pred.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    norm = param_norm(model, list(model.parameters()))
    gathered = full_state_dict(model)
    if rank == 0:
        whole = torch.nn.utils.get_total_norm([v.float() for v in gathered.values()])
        shard = torch.nn.utils.get_total_norm([p.detach().to_local() for p in model.parameters()])
        assert float(shard) < 0.9 * float(whole)  # rank 0's shard alone is not the model
        assert abs(norm - float(whole)) <= 1e-4 * float(whole), (norm, float(whole))
        cfg = FinetuneConfig(model=model_dir, mode="full", gradient_checkpointing=True, fsdp=True)
        save_tuned(model, Path(out), cfg, "flux", gathered)
    dist.barrier()
    dist.destroy_process_group()

