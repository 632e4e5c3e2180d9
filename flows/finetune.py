"""The finetune flow: Diffusion-DPO on curated pairs (and any other Pick-a-Pic-format sources).

It launches `accelerate launch -m richpref.training.train` on N processes and waits. The output folder
defaults to data/finetune/<config name> (data/finetune/<config name>-<pairs key> when a curate run
launched it: each curated set of pairs gets its own model): running the same flow again after a crash
resumes from the latest checkpoint, and running it after success returns at once.

    prefect deployment run 'finetune/<name>' --param pairs=data/runs/demo/pairs
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow

from richpref.schemas.training import load_finetune_config
from richpref.training.finetune import check_before_launch, default_output_dir, summary_markdown, train_task, with_pairs


@flow(name="finetune")
def finetune(config: str = "finetune-tiny", pairs: str | None = None, output_dir: str | None = None,
             overrides: list[str] | None = None, num_processes: int = 1, max_restarts: int = 1,
             data_dir: str = "data", models_root: str | None = None, pairs_key: str | None = None) -> dict:
    """Train with `config` (a name in configs/ or a YAML path); `pairs` replaces its `pairs` source;
    `models_root` (else RICHPREF_MODELS_ROOT) replaces its models_root. `pairs_key` (given by a curate
    run that launches this flow) trains into a folder of those pairs' own, unless `output_dir` is given."""
    from prefect.artifacts import create_markdown_artifact

    cfg = with_pairs(load_finetune_config(config, overrides, models_root), pairs)
    out = output_dir or default_output_dir(cfg, data_dir, pairs_key)
    check_before_launch(cfg, out)  # a bad config fails here naming the fix, not in each launch of the trainer
    meta = train_task(cfg, out, num_processes, max_restarts)
    final = str(Path(out) / "final")
    create_markdown_artifact(summary_markdown(cfg, meta, final), key="finetune-summary",
                             description=f"finetune {cfg.name}")
    return {"output_dir": out, "final": final, "steps": meta["steps"], "arch": meta["arch"], "mode": meta["mode"],
            "config_hash": meta["config_hash"], "last_metrics": meta.get("last_metrics") or {}}
