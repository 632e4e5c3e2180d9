"""RPO rounds: curate -> fine-tune -> sample from the tuned model -> curate again (iterative DPO).

The steps of the rounds flow (flows/rounds.py). Round k is its own curate run (`<name>-round-<k>`)
and its own finetune output (`<data>/rounds/<name>/round-<k>/finetune`); round k > 1 samples with
round k-1's tuned weights (`sample.lora` / `sample.unet`) and fine-tunes from them (`init_from`).
`<data>/rounds/<name>/rounds.json` records each finished round: a rerun skips those and enters the
interrupted round, whose curate shards, finetune checkpoints and evaluation images are reused by
their own keys. After each round, base and every round are evaluated on the same prompts and seeds
into one table (table.parquet, table.md, rewards.png).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from richpref.schemas.config import load_profile
from richpref.schemas.rounds import RoundsConfig
from richpref.schemas.tables import OK
from richpref.schemas.training import load_evaluate_config, load_finetune_config

# Tests stop a rounds run where they want it: "2:curate" SIGKILLs this process right after round 2's
# curate ("2:finetune" after its fine-tune).
FAULTS_ENV = "RICHPREF_ROUNDS_FAULTS"
STATE = "rounds.json"


def rounds_dir(data_dir: str, cfg: RoundsConfig) -> Path:
    """Each round's fine-tune and the table: local files (the curated runs may live on an object store)."""
    from richpref.common.objstore import local_folder

    return Path(local_folder(data_dir, "rounds", cfg.name, what="rounds"))


def round_run(cfg: RoundsConfig, k: int) -> str:
    return f"{cfg.name}-round-{k}"


def finetune_dir(data_dir: str, cfg: RoundsConfig, k: int) -> str:
    return str(rounds_dir(data_dir, cfg) / f"round-{k}" / "finetune")


def inject_fault(k: int, step: str) -> None:
    if f"{k}:{step}" in {x.strip() for x in os.environ.get(FAULTS_ENV, "").split(",")}:
        os.kill(os.getpid(), signal.SIGKILL)


def _set(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: paths and lists pass through the override parser


def _models_root(cfg: RoundsConfig) -> list[str]:
    return [_set("models_root", cfg.models_root)] if cfg.models_root else []


def round_prompts(cfg: RoundsConfig) -> list[list[str]]:
    """Every round's prompts of the profile's source (`prompts: next`: prompts_per_round rows each, in
    order), read in one pass. The source's `limit` bounds the rows all rounds share (its `offset` is where
    they start). A round left without a usable row is refused (ValueError), so before round 1 starts."""
    from richpref.tasks.source import iter_source_rows

    source = load_profile(cfg.profile, cfg.curate_overrides, cfg.models_root).source
    n = cfg.prompts_per_round
    end = cfg.rounds * n if source.limit is None else min(cfg.rounds * n, source.limit)
    slices: list[list[str]] = [[] for _ in range(cfg.rounds)]
    for i, row in enumerate(iter_source_rows(source.model_copy(update={"limit": end}))):
        if row["status"] == OK:
            slices[i // n].append(row["prompt"].replace("\n", " "))
    for k, prompts in enumerate(slices, 1):
        if not prompts:
            lo, hi = (k - 1) * n, min(k * n, end)
            rows = f"rows {lo}..{hi - 1}" if hi > lo else f"row {lo} or later (source.limit is {source.limit})"
            raise ValueError(f"round {k}: the source has no usable {rows} (prompts: next); lower rounds "
                             "or prompts_per_round, raise source.limit, or use prompts: same")
    return slices


def preflight(cfg: RoundsConfig) -> list[list[str]] | None:
    """What every round needs, checked before round 1 (by the command before Prefect starts, and by the
    flow, which deployments run): round 1's models and prompt templates, the source's rows for every round,
    the fine-tune's model, family and other pairs sources, that later rounds can sample and fine-tune from
    the tuned weights, and the evaluation. Raises ProfileError, ModelNotAvailable, ModelProblem,
    DataDirError or ValueError naming the problem. Returns every round's prompts (`prompts: next`), else None."""
    from richpref.doctor.checks import check_key_inputs, resolve_models
    from richpref.tasks import stages_for
    from richpref.training.evaluation import preflight as evaluate_preflight
    from richpref.training.finetune import PAIRS_SOURCE
    from richpref.training.setup import preflight as finetune_preflight

    profile = load_profile(cfg.profile, cfg.curate_overrides, cfg.models_root)
    resolve_models(profile)
    check_key_inputs(profile, stages_for(profile))
    slices = round_prompts(cfg) if cfg.prompts == "next" else None
    # round 1's fine-tune, whose own pairs round 1 makes (they may hold the edit masks the others lack)
    tune = load_finetune_config(cfg.finetune, finetune_overrides(cfg, None, []))
    arch = finetune_preflight(tune, made_later=frozenset({PAIRS_SOURCE}))
    check_same_base(profile, tune, arch)
    check_continues(cfg, tune, arch)
    evaluate_preflight(load_evaluate_config(cfg.evaluate, evaluate_overrides(cfg, [])))
    return slices


def prompt_slice(cfg: RoundsConfig, k: int, data_dir: str, prompts: list[str]) -> str:
    """Round k's prompts (`round_prompts(cfg)[k - 1]`) as a prompts file; returns its path."""
    path = rounds_dir(data_dir, cfg) / f"round-{k}" / "prompts.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return str(path)


def curate_overrides(cfg: RoundsConfig, k: int, data_dir: str, previous: dict | None,
                     slices: list[list[str]] | None) -> list[str]:
    """The profile overrides of round k: its source slice (`prompts: next`: `slices` holds every round's
    prompts, read once by round_prompts; None with `prompts: same`), and round k-1's weights for sampling."""
    out = list(cfg.curate_overrides)
    if cfg.prompts == "next":
        out += [_set("source.kind", "prompts"), _set("source.path", prompt_slice(cfg, k, data_dir, slices[k - 1])),
                _set("source.limit", None), _set("source.image_column", None), _set("source.pickapic_preferred", False)]
    if previous is not None:
        key = "sample.lora" if previous["mode"] == "lora" else "sample.unet"
        out += [_set(key, previous["output_dir"]), _set("sample.use_dataset_image", False)]
    return out


def check_same_base(profile, tune, arch: str) -> None:
    """Rounds are on-policy: round 1 samples with the profile's sample.model and every later round with
    the weights tuned from the fine-tune's model, so both must be one family (a LoRA of another base
    loads nothing). ValueError naming both."""
    from richpref.models.families import base_family, detect_checkpoint_family
    from richpref.models.runtime import resolve_model_ref

    sampler = detect_checkpoint_family(resolve_model_ref(profile.sample.model, profile.models_root))
    if base_family(sampler) != arch:
        raise ValueError(f"rounds: the profile samples with {profile.sample.model!r} (a {sampler} checkpoint) and the "
                         f"fine-tune tunes {tune.model!r} (a {arch} one); round 2 samples with the tuned weights: give "
                         "the profile and the finetune config the same base model")


def check_continues(cfg: RoundsConfig, tune, arch: str) -> None:
    """Round k > 1 samples with round k-1's tuned weights and fine-tunes from them: flow-matching models
    do both with a LoRA only (curate samples them with `sample.lora`; Flow-DPO's init_from continues a
    LoRA). ValueError naming the fix, before round 1 rather than after it."""
    from richpref.schemas.training import FLOW_ARCHS

    if cfg.rounds > 1 and tune.mode == "full" and arch in FLOW_ARCHS:
        raise ValueError(f"rounds: {cfg.rounds} rounds of a full fine-tune of {tune.model!r} (a {arch} flow-matching "
                         "model): round 2 samples with round 1's weights and fine-tunes from them, which a flow-matching "
                         "model does with a LoRA only; set the fine-tune's mode: lora (--set 'finetune_overrides="
                         "[\"mode=lora\"]'), or rounds: 1")


def finetune_overrides(cfg: RoundsConfig, previous: dict | None, earlier_pairs: list[str],
                       text_cache: str | None = None) -> list[str]:
    """Round k's finetune overrides: start from round k-1's weights; mix in earlier rounds' pairs; keep
    Flow-DPO caption embeddings in `text_cache`, shared by the rounds (the same prompts are not encoded again)."""
    out = [*cfg.finetune_overrides, *_models_root(cfg)]
    if text_cache:
        out.append(_set("text_cache_dir", text_cache))
    if previous is not None:
        out += [_set("init_from", previous["output_dir"]),
                _set("reference", "init" if cfg.reference == "previous" else "base")]
    if cfg.mix_previous > 0 and earlier_pairs:
        base = load_finetune_config(cfg.finetune, out)
        data = [s.model_dump(mode="json", exclude_none=True) for s in base.data]
        data += [{"name": f"round-{j}", "path": p, "weight": cfg.mix_previous} for j, p in enumerate(earlier_pairs, 1)]
        out.append(_set("data", data))
    return out


def evaluate_overrides(cfg: RoundsConfig, finals: list[str]) -> list[str]:
    """The evaluate config's first model (the base) and every round's tuned model, in round order."""
    out = [*cfg.evaluate_overrides, *_models_root(cfg)]
    base = load_evaluate_config(cfg.evaluate, out).models[0]
    models = [{"name": base.name, "path": base.path}] + [{"name": f"round-{k}", "path": d}
                                                          for k, d in enumerate(finals, 1)]
    return [*out, _set("models", models)]


def curate_stats(data_dir: str, run: str) -> dict:
    """Pairs kept and flip rate of a finished curate run."""
    from richpref.views.inspect import summary

    s = summary(data_dir, run)
    pairs = next((st["kept"] for st in s["stages"] if st["stage"] == "pairs"), 0)
    return {"run": run, "pairs_kept": pairs, "flip_rate": s.get("flip_rate")}


def rounds_table(eval_rows: list[dict], curated: list[dict]) -> list[dict]:
    """One row per model (base, round 1, …): the evaluation's columns, then the round's curate figures."""
    rows = []
    for i, er in enumerate(eval_rows):
        c = curated[i - 1] if 0 < i <= len(curated) else {}
        rows.append({"model": er["model"], "round": i, **{k: v for k, v in er.items() if k != "model"},
                     "flip_rate": c.get("flip_rate"), "pairs_kept": c.get("pairs_kept")})
    return rows


def rewards_plot(rows: list[dict], rewards: list[str], path: Path) -> None:
    """Each reward's mean per round (round 0 = base), one panel per reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rewards), figsize=(3 * len(rewards), 2.6), squeeze=False)
    x = [r["round"] for r in rows]
    for ax, name in zip(axes[0], rewards):
        ax.plot(x, [r[name] for r in rows], marker="o")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(x, ["base" if i == 0 else str(i) for i in x], fontsize=8)
        ax.set_xlabel("round", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_table(out: Path, rows: list[dict], rewards: list[str]) -> str:
    """table.parquet, table.md and rewards.png under `out`; returns the markdown."""
    from richpref.training.evaluation import to_markdown

    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "table.parquet")
    markdown = to_markdown(rows)
    (out / "table.md").write_text(markdown, encoding="utf-8")
    rewards_plot(rows, rewards, out / "rewards.png")
    return markdown


# Rounds config values that leave what each round curates and learns as it was: more rounds, another
# evaluation, models moved. Any other change under the same name is refused (it would curate the recorded
# rounds' runs again, replacing their pairs, and then meet their fine-tunes' checkpoints).
_EXTENDS_RECORD = {"name", "rounds", "evaluate", "evaluate_overrides", "models_root"}


class OtherRounds(ValueError):
    """The rounds folder holds finished rounds of a config that curates or learns otherwise."""


class RoundsState:
    """`rounds.json`: the finished rounds of this config (a config that only adds rounds or changes the
    evaluation starts the record afresh; the rounds are then found done by their curate and finetune keys)."""

    def __init__(self, data_dir: str, cfg: RoundsConfig) -> None:
        from richpref.schemas.common import setting_changes

        self.path = rounds_dir(data_dir, cfg) / STATE
        self.config = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]
        self.settings = cfg.model_dump(mode="json")
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        recorded = {k: v for k, v in data.get("settings", {}).items() if k not in _EXTENDS_RECORD}
        now = {k: v for k, v in self.settings.items() if k not in _EXTENDS_RECORD}
        if data.get("rounds") and recorded and (changes := setting_changes(recorded, now)):
            raise OtherRounds(
                f"{self.path.parent} holds round(s) {', '.join(sorted(data['rounds'], key=int))} of another rounds "
                f"config (changed: {', '.join(changes)}): give these rounds a name of their own (--set "
                f"name={cfg.name}-2), or delete {self.path.parent} to start its rounds over")
        self.rounds: dict[str, dict] = data.get("rounds", {}) if data.get("config") == self.config else {}

    def done(self, k: int) -> dict | None:
        rec = self.rounds.get(str(k))
        return rec if rec and Path(rec["finetune"]["output_dir"], "final").exists() else None

    def finish(self, k: int, record: dict) -> None:
        self.rounds[str(k)] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": self.config, "settings": self.settings, "rounds": self.rounds}, indent=2))
        tmp.replace(self.path)
