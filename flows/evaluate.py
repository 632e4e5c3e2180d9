"""The evaluate flow: the same prompts and seeds through every model, scored by the reward registry.

Writes images/<model>.parquet, scores.parquet, table.parquet, table.md and grid.png into the output
folder (richpref/training/evaluation.py) and a Prefect table artifact of the table.
"""
from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow

from richpref.training.evaluation import (artifact_key, default_output_dir, generate_task, image_plan, preflight,
                                 score_task, with_data_dir, write_results)
from richpref.schemas.training import load_evaluate_config

log = logging.getLogger("richpref")


@flow(name="evaluate")
def evaluate(config: str = "evaluate-tiny", overrides: list[str] | None = None, output_dir: str | None = None,
             data_dir: str = "data", models_root: str | None = None) -> dict:
    """Generate with every model of `config` from the same prompts and seeds, score, tabulate;
    `models_root` (else RICHPREF_MODELS_ROOT) replaces its models_root."""
    from prefect.artifacts import create_table_artifact

    from richpref.models.runtime import resident

    cfg = with_data_dir(load_evaluate_config(config, overrides, models_root), data_dir)
    prompts = preflight(cfg)
    out = Path(output_dir or default_output_dir(cfg, data_dir))
    out.mkdir(parents=True, exist_ok=True)
    texts, seeds, index = image_plan(prompts, cfg)
    log.info("evaluate %s: %d prompts × %d images × %d models", cfg.name, len(prompts), cfg.images_per_prompt,
             len(cfg.models))
    resident.release()  # nothing of the curate stages stays loaded while models generate
    files = {m.name: generate_task(m, texts, seeds, cfg, str(out)) for m in cfg.models}
    scores = {name: score_task(name, cfg, files) for name in cfg.rewards}
    result = write_results(out, cfg, files, scores, texts, seeds, index)
    create_table_artifact(result["table"], key=artifact_key(cfg.name),
                          description=f"Mean reward per model over {len(texts)} images ({len(prompts)} prompts)"
                          + "".join(f"; {t}" for n, t in result.pop("titles").items() if t != n))
    # The table is the artifact (UI) and the command's output (CLI); the log says where its files are.
    log.info("evaluate %s: table of %d model(s) written to %s (table.md, table.parquet, scores.parquet)", cfg.name,
             len(cfg.models), out)
    return {"output_dir": str(out), **result, "prompts": len(prompts), "images_per_model": len(texts)}
