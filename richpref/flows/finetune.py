"""The finetune flow: Diffusion-DPO on curated pairs (and any other Pick-a-Pic-format sources).

It launches `accelerate launch -m richpref.training.train` on N processes and waits. The output folder
defaults to data/finetune/<config name>: running the same flow again after a crash resumes from the
latest checkpoint, and running it after success returns at once.

    prefect deployment run 'finetune/<name>' --param pairs=data/runs/demo/pairs
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from richpref.schemas.training import FinetuneConfig, PairSourceConfig, load_finetune_config
from richpref.training.launcher import launch_training
from richpref.training.train import METRICS

log = logging.getLogger("richpref")

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


def default_output_dir(cfg: FinetuneConfig, data_dir: str) -> str:
    """<data_dir>/finetune/<config name>: where a rerun of the same config resumes."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.name) or "finetune"
    return str(Path(data_dir) / "finetune" / name)


def _last_metrics(output_dir: str) -> dict:
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
        step = _last_metrics(output_dir).get("step", 0)
        update_progress_artifact(progress, 100.0 * step / cfg.max_train_steps)

    meta = launch_training(cfg, output_dir, num_processes=num_processes, max_restarts=max_restarts,
                           log_file=str(Path(output_dir) / "train.log"), on_poll=report)
    update_progress_artifact(progress, 100.0)
    return meta


@flow(name="finetune")
def finetune(config: str = "finetune-tiny", pairs: str | None = None, output_dir: str | None = None,
             overrides: list[str] | None = None, num_processes: int = 1, max_restarts: int = 1,
             data_dir: str = "data") -> dict:
    """Train with `config` (a name in configs/ or a YAML path); `pairs` replaces its `pairs` source."""
    from prefect.artifacts import create_markdown_artifact

    cfg = with_pairs(load_finetune_config(config, overrides), pairs)
    out = output_dir or default_output_dir(cfg, data_dir)
    meta = train_task(cfg, out, num_processes, max_restarts)
    last = meta.get("last_metrics") or {}
    final = str(Path(out) / "final")
    lines = [f"# finetune {cfg.name}", "", f"- tuned weights: `{final}` ({meta['arch']} {meta['mode']}, "
             f"{meta['steps']} steps)", f"- base model: `{meta['base_model']}`",
             f"- data: {', '.join(f'{s.label} (weight {s.weight:g})' for s in cfg.data)}"]
    if last:
        lines.append(f"- last step: loss {last['loss']:.4f}, implicit accuracy {last['implicit_acc']:.3f}, "
                     f"reward margin {last['reward_margin']:.4g}")
    create_markdown_artifact("\n".join(lines), key="finetune-summary", description=f"finetune {cfg.name}")
    return {"output_dir": out, "final": final, "steps": meta["steps"], "arch": meta["arch"], "mode": meta["mode"],
            "config_hash": meta["config_hash"], "last_metrics": last}
