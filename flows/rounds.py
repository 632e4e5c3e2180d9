"""The rounds flow: RPO's iterative DPO. Round k curates (round k > 1 samples with round k-1's tuned
weights), fine-tunes (from round k-1's weights), then base and every round are evaluated on the same
prompts and seeds into one table. The steps are richpref/recipes/rounds.py's; a rerun continues at the
interrupted round.

    prefect deployment run 'rounds/tiny' --watch
"""
from __future__ import annotations

import logging

from prefect import flow

from flows.curate import curate
from flows.evaluate import evaluate
from flows.finetune import finetune
from richpref.recipes.rounds import (RoundsState, curate_overrides, curate_stats, evaluate_overrides, finetune_dir,
                                     finetune_overrides, inject_fault, preflight, round_run, rounds_dir,
                                     rounds_table, write_table)
from richpref.schemas.rounds import load_rounds_config
from richpref.run.storage import RunStore

log = logging.getLogger("richpref")


@flow(name="rounds")
def rounds(config: str = "rounds-tiny", overrides: list[str] | None = None, data_dir: str = "data",
           models_root: str | None = None) -> dict:
    """Run the rounds of `config` (a name in configs/ or a YAML path); returns the table of every round.
    `models_root`: where the models are, over the config's (else RICHPREF_MODELS_ROOT)."""
    from prefect.artifacts import create_table_artifact

    cfg = load_rounds_config(config, overrides, models_root)
    state = RoundsState(data_dir, cfg)
    # every round's models, prompts (read once), fine-tune and evaluation: what fails, fails before round 1
    slices = preflight(cfg)
    out = rounds_dir(data_dir, cfg)
    finished: list[dict] = []
    result: dict = {"rounds_dir": str(out), "table": [], "markdown": ""}
    for k in range(1, cfg.rounds + 1):
        record = state.done(k)
        if record is not None:
            log.info("rounds %s: round %d finished before, skipped", cfg.name, k)
            finished.append(record)
            continue
        previous = finished[-1]["finetune"] if finished else None
        run = round_run(cfg, k)
        curate(profile=cfg.profile, run=run, data_dir=data_dir, models_root=cfg.models_root,
               overrides=curate_overrides(cfg, k, data_dir, previous, slices))
        inject_fault(k, "curate")
        store = RunStore(data_dir, run)
        pairs = store.uri(store.stage_dir("pairs"))
        tuned = finetune(config=cfg.finetune, pairs=pairs, output_dir=finetune_dir(data_dir, cfg, k),
                         overrides=finetune_overrides(cfg, previous, [r["pairs"] for r in finished], str(out)),
                         data_dir=data_dir,
                         models_root=cfg.models_root)
        inject_fault(k, "finetune")
        finished.append({"round": k, "run": run, "pairs": pairs, "curate": curate_stats(data_dir, run),
                         "finetune": {"output_dir": tuned["output_dir"], "mode": tuned["mode"], "steps": tuned["steps"]}})
        evaluated = evaluate(config=cfg.evaluate, overrides=evaluate_overrides(cfg, [r["finetune"]["output_dir"] for r in finished]),
                             output_dir=str(out / "evaluate"), data_dir=data_dir, models_root=cfg.models_root)
        rows = rounds_table(evaluated["table"], [r["curate"] for r in finished])
        rewards = [c for c in evaluated["table"][0] if c not in ("model", "images") and "_win_vs_" not in c]
        markdown = write_table(out, rows, rewards)
        create_table_artifact(rows, key=f"rounds-{cfg.name}".lower().replace("_", "-"),
                              description=f"{cfg.name}: base and rounds 1..{k}, same prompts and seeds")
        state.finish(k, {**finished[-1], "table": rows})
        result = {"rounds_dir": str(out), "table": rows, "markdown": markdown}
    if finished and not result["table"]:  # every round was done before: the recorded table
        result = {"rounds_dir": str(out), "table": finished[-1]["table"],
                  "markdown": (out / "table.md").read_text(encoding="utf-8")}
    return result
