"""The finetune flow's steps: the pairs source, the output folder, the training task, the summary.

flows/finetune.py composes them; `richpref finetune` makes the flow's checks (check_before_launch) before
Prefect starts too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from richpref.schemas.training import FinetuneConfig, PairSourceConfig
from richpref.training.heldout import PLOT
from richpref.training.launcher import Machines, launch_training
from richpref.training.train import METRICS

PAIRS_SOURCE = "pairs"


def with_pairs(cfg: FinetuneConfig, pairs: str | None) -> FinetuneConfig:
    """The config with its `pairs` source pointing at `pairs` (added with weight 1 if it has none)."""
    if not pairs:
        return cfg
    data = [s for s in cfg.data if s.name != PAIRS_SOURCE]
    old = next((s for s in cfg.data if s.name == PAIRS_SOURCE), None)
    weight = old.weight if old else 1.0
    data.append(PairSourceConfig(name=PAIRS_SOURCE, path=str(pairs), weight=weight))
    return cfg.model_copy(update={"data": data})


def default_output_dir(cfg: FinetuneConfig, data_dir: str, pairs_key: str | None = None) -> str:
    """<data_dir>/finetune/<config name>: where a rerun of the same config resumes. With `pairs_key` (a
    finetune that a curate run launched: `flows.launch.pairs_key`), <config name>-<key[:12]>: each set of
    pairs trains its own model, where one folder would refuse pairs it did not train on."""
    from richpref.common.objstore import local_folder

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.name) or "finetune"
    if pairs_key:
        name = f"{name}-{pairs_key[:12]}"
    return local_folder(data_dir, "finetune", name, what="finetune")


def check_before_launch(cfg: FinetuneConfig, output_dir: str) -> str:
    """What would fail in the trainer, refused before it launches (by `richpref finetune` before Prefect
    starts, and by the flow, which deployments run): the model, its family and the data sources, the
    FSDP device, and checkpoints of another config in `output_dir`. Returns the model's family."""
    from richpref.training.checkpoints import check_resumable
    from richpref.training.launcher import check_fsdp_device
    from richpref.training.setup import preflight

    arch = preflight(cfg)
    check_fsdp_device(cfg)
    check_resumable(cfg, output_dir)
    return arch


def last_metrics(output_dir: str) -> dict:
    path = Path(output_dir) / METRICS
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


@task(name="dpo-train", cache_policy=NO_CACHE)
def train_task(cfg: FinetuneConfig, output_dir: str, num_processes: int, max_restarts: int) -> dict:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    progress = create_progress_artifact(0.0, description=f"DPO steps done in {output_dir}")

    def report() -> None:
        step = last_metrics(output_dir).get("step", 0)
        update_progress_artifact(progress, 100.0 * step / cfg.max_train_steps)

    meta = launch_training(cfg, output_dir, num_processes=num_processes, max_restarts=max_restarts,
                           log_file=str(Path(output_dir) / Machines.from_env().log_name()), on_poll=report)
    update_progress_artifact(progress, 100.0)
    return meta


def summary_markdown(cfg: FinetuneConfig, meta: dict, final: str) -> str:
    last = meta.get("last_metrics") or {}
    lines = [f"# finetune {cfg.name}", "", f"- tuned weights: `{final}` ({meta['arch']} {meta['mode']}, "
             f"{meta['steps']} steps)", f"- base model: `{meta['base_model']}`",
             f"- data: {', '.join(f'{s.label} (weight {s.weight:g})' for s in cfg.data)}"]
    if last:
        lines.append(f"- last step: loss {last['loss']:.4f}, implicit accuracy {last['implicit_acc']:.3f}, "
                     f"reward margin {last['reward_margin']:.4g}")
    if "heldout_implicit_acc" in last:
        lines.append(f"- held-out ({last['heldout_pairs']} pairs × {last['heldout_draws']} draws): implicit accuracy "
                     f"{last['heldout_implicit_acc']:.3f}, reward margin {last['heldout_reward_margin']:.4g}")
    if last.get("warning"):
        lines.append(f"- **warning**: {last['warning']}")
    plot = Path(final).parent / PLOT
    if plot.exists():
        lines.append(f"- curves: `{plot}`")
    return "\n".join(lines)
