"""Evaluation: the same prompts and seeds through every model, scored by the reward registry.

Writes into the output folder:
  images/<model>.parquet   prompt, seed, PNG bytes (reused when prompts, seeds and settings match)
  scores.parquet           one row per image: model, prompt, seed, one column per reward
  table.parquet, table.md  mean of each reward per model (as RPO's Table 1), plus each model's win
                           rate against the first (baseline) model on the same prompt and seed
  grid.png                 side by side: one row per prompt, one column per model
and a Prefect table artifact of the table (flows/evaluate.py composes these steps).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from prefect import task
from prefect.cache_policies import NO_CACHE

from richpref.common.images import decode_image, encode_png
from richpref.models.runtime import resolve_model_ref
from richpref.schemas.tables import OK
from richpref.schemas.training import EvalModelConfig, EvaluateConfig

log = logging.getLogger("richpref")

KEY_META = b"richpref.eval_key"


def with_data_dir(cfg: EvaluateConfig, data_dir: str) -> EvaluateConfig:
    """`cfg` with each relative model `path` that names a finetune output under the data dir (the shipped
    configs say `finetune/<finetune config's name>`, where `richpref finetune` writes) and each relative `lora`
    found there made absolute; other references keep resolving against models_root, then the cwd."""
    from richpref.training.models import is_finetune_output

    root = Path(data_dir).expanduser()

    def under(ref: str | None, accept) -> str | None:
        if ref is None or Path(ref).expanduser().is_absolute():
            return ref
        cand = root / ref
        return str(cand.resolve()) if accept(cand) else ref

    models = [m.model_copy(update={"path": under(m.path, is_finetune_output), "lora": under(m.lora, Path.exists)})
              for m in cfg.models]
    return cfg.model_copy(update={"models": models})


def load_prompts(cfg: EvaluateConfig) -> list[str]:
    """Kept prompts of the configured source, first occurrence of each (benchmarks repeat prompts)."""
    from richpref.tasks.source import iter_source_rows

    prompts, seen = [], set()
    for row in iter_source_rows(cfg.prompts):
        if row["status"] == OK and row["prompt"] not in seen:
            seen.add(row["prompt"])
            prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"evaluate.prompts ({cfg.prompts.kind} {cfg.prompts.path or cfg.prompts.dataset}) gave no usable prompt")
    return prompts


def image_plan(prompts: list[str], cfg: EvaluateConfig) -> tuple[list[str], list[int], list[int]]:
    """(prompt per image, seed per image, prompt index per image): identical for every model."""
    k = cfg.images_per_prompt
    texts = [p for p in prompts for _ in range(k)]
    seeds = [cfg.seed + i * k + j for i in range(len(prompts)) for j in range(k)]
    index = [i for i in range(len(prompts)) for _ in range(k)]
    return texts, seeds, index


def _generation_key(model: EvalModelConfig, texts: list[str], seeds: list[int], cfg: EvaluateConfig) -> str:
    from richpref.models.tuned import tuned_fingerprint, weights_fingerprint
    from richpref.training.models import is_finetune_output

    settings = {"path": model.path, "models_root": cfg.models_root, "texts": texts, "seeds": seeds,
                **cfg.model_dump(mode="json", include={"steps", "guidance_scale", "height", "width", "scheduler",
                                           "safety_checker"})}
    # Added later: in the key only when set, so the images of older configs stay up to date.
    if cfg.max_sequence_length is not None:
        settings["max_sequence_length"] = cfg.max_sequence_length
    if model.lora:
        settings["lora"] = weights_fingerprint(lora=model.lora)
    if is_finetune_output(model.path):  # the weights' content: a folder trained again is a new key
        settings["tuned"] = tuned_fingerprint(model.path)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def load_model(model: EvalModelConfig, cfg: EvaluateConfig):
    """A finetune output folder (its base plus the tuned weights) or a plain diffusers pipeline, with
    `model.lora` (a LoRA of its UNet or flow-matching transformer) loaded over it when given."""
    from richpref.models.generator import TextToImage
    from richpref.models.tuned import apply_tuned
    from richpref.training.models import is_finetune_output, load_finetuned

    if is_finetune_output(model.path):
        t2i = load_finetuned(model.path, device=cfg.device, dtype=cfg.dtype, scheduler=cfg.scheduler,
                              safety_checker=cfg.safety_checker)
    else:
        t2i = TextToImage.load(resolve_model_ref(model.path, cfg.models_root), device=cfg.device, dtype=cfg.dtype,
                               scheduler=cfg.scheduler, safety_checker=cfg.safety_checker)
    apply_tuned(t2i, lora=model.lora)
    return t2i


@task(name="eval-generate", task_run_name="generate-{model.name}", cache_policy=NO_CACHE)
def generate_task(model: EvalModelConfig, texts: list[str], seeds: list[int], cfg: EvaluateConfig, out: str) -> str:
    path = Path(out) / "images" / f"{model.name}.parquet"
    key = _generation_key(model, texts, seeds, cfg)
    if path.exists() and (pq.read_schema(path).metadata or {}).get(KEY_META, b"").decode() == key:
        log.info("evaluate: images of %s are up to date", model.name)
        return str(path)
    t2i = load_model(model, cfg)
    try:
        images = t2i.generate(texts, seeds, steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=cfg.height,
                              width=cfg.width, batch_size=cfg.batch_size, max_sequence_length=cfg.max_sequence_length)
    finally:
        t2i.close()
    table = pa.table({"prompt": texts, "seed": pa.array(seeds, pa.int64()), "image": [encode_png(im) for im in images]})
    table = table.replace_schema_metadata({KEY_META: key.encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return str(path)


@task(name="eval-score", task_run_name="score-{name}", cache_policy=NO_CACHE)
def score_task(name: str, cfg: EvaluateConfig, image_files: dict[str, str]) -> dict[str, list[float]]:
    """Scores of every model's images with reward `name`, per model in image order."""
    from richpref.models.rewards import load_reward_spec

    reward = load_reward_spec(cfg.rewards[name], cfg.models_root, device=cfg.device, dtype=cfg.dtype)
    out = {}
    try:
        for model, path in image_files.items():
            t = pq.read_table(path)
            images = [decode_image(b) for b in t.column("image").to_pylist()]
            out[model] = [float(x) for x in reward.score(images, t.column("prompt").to_pylist(), batch_size=cfg.batch_size)]
    finally:
        close = getattr(reward, "close", None)
        if close:
            close()
    return out


def default_output_dir(cfg: EvaluateConfig, data_dir: str) -> str:
    """<data_dir>/evaluate/<config name>: a local folder (its images and tables are local files)."""
    from richpref.common.objstore import local_folder

    return local_folder(data_dir, "evaluate", cfg.name, what="evaluate")


def preflight(cfg: EvaluateConfig) -> list[str]:
    """Before anything loads: the prompts read (returned), only per-image rewards (pair rewards rate an
    edit against its original), and every model must resolve (a missing one fails now, not after all
    the generating)."""
    from richpref.models.rewards import MODEL_REF_OPTIONS, PAIR_KINDS
    from richpref.models.runtime import ModelNotAvailable
    from richpref.models.families import check_sequence_length, detect_checkpoint_family
    from richpref.models.tuned import tuned_elsewhere
    from richpref.tasks.source import SourceError
    from richpref.training.models import is_finetune_output, read_meta

    try:
        prompts = load_prompts(cfg)
    except SourceError as exc:
        raise ValueError(f"evaluate.prompts: {exc}") from None

    pairwise = [f"{n} ({s.kind})" for n, s in cfg.rewards.items() if s.kind in PAIR_KINDS]
    if pairwise:
        raise ValueError(f"evaluate.rewards {', '.join(pairwise)} score pairs, not single images: remove them")
    for spec in cfg.rewards.values():
        for ref in [spec.model, *(getattr(spec, k, None) for k in MODEL_REF_OPTIONS)]:
            if ref is not None:
                resolve_model_ref(ref, cfg.models_root)
    for model in cfg.models:
        if model.lora:  # a missing LoRA fails now
            from richpref.models.tuned import TunedWeightsError, lora_file

            try:
                lora_file(model.lora)
            except TunedWeightsError as exc:
                raise ModelNotAvailable(f"evaluate model {model.name!r}: {exc}") from None
        if is_finetune_output(model.path):
            base = read_meta(model.path).get("base_model_path") or ""
        else:
            try:
                base = resolve_model_ref(model.path, cfg.models_root)
            except ModelNotAvailable as exc:
                raise ModelNotAvailable(f"evaluate model {model.name!r}: {exc} A finetune output folder has "
                                        "final/finetune.json: run `richpref finetune` first.") from None
        if base and Path(base, "model_index.json").is_file():  # the sampler refuses these after loading
            family = detect_checkpoint_family(base)
            try:
                check_sequence_length(family, cfg.max_sequence_length)
            except ValueError as exc:
                raise ValueError(f"evaluate model {model.name!r}: {exc}") from None
            why = tuned_elsewhere(model.lora, family) if model.lora else None
            if why:
                raise ValueError(f"evaluate model {model.name!r}: its lora {why} ({model.path}): give the LoRA's own base")
    return prompts


WIN_VS = "_win_vs_"  # a win-rate column: f"{reward}{WIN_VS}{base model}"


def summary_table(scores: dict[str, dict[str, list[float]]], models: list[str]) -> list[dict]:
    """One row per model: images, mean of each reward, win rate against models[0] (ties count half)."""
    rows = []
    base = models[0]
    for m in models:
        row: dict = {"model": m, "images": len(next(iter(scores.values()))[m])}
        for reward, per_model in scores.items():
            row[reward] = float(np.mean(per_model[m]))
        for reward, per_model in scores.items():
            a, b = np.asarray(per_model[m]), np.asarray(per_model[base])
            row[f"{reward}{WIN_VS}{base}"] = None if m == base else float(np.mean((a > b) + 0.5 * (a == b)))
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], titles: dict[str, str] | None = None) -> str:
    """The table; `titles` names a reward's columns where its name alone is not enough (HPSv2's version)."""
    cols = list(rows[0])
    fmt = lambda v: "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731

    def head(c: str) -> str:  # "hpsv2_win_vs_base" -> "hpsv2 (HPSv2 v2.0) win vs base"
        name, win, base = c.partition(WIN_VS)
        title = (titles or {}).get(name, name)
        return f"{title} win vs {base}" if win else title

    lines = ["| " + " | ".join(head(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def image_grid(image_files: dict[str, str], prompt_index: list[int], n_prompts: int, cell: int) -> Image.Image:
    """Rows: the first image of each of the first `n_prompts` prompts; columns: models, labelled on top."""
    models = list(image_files)
    firsts = [k for k, i in enumerate(prompt_index) if k == 0 or prompt_index[k - 1] != i][:n_prompts]
    header = 16
    grid = Image.new("RGB", (cell * len(models), header + cell * len(firsts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, model in enumerate(models):
        draw.text((c * cell + 4, 2), model, fill="black")
        images = pq.read_table(image_files[model], columns=["image"]).column("image").to_pylist()
        for r, k in enumerate(firsts):
            im = decode_image(images[k]).resize((cell, cell), Image.BILINEAR)
            grid.paste(im, (c * cell, header + r * cell))
    return grid


def artifact_key(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"evaluate-{name}".lower()).strip("-")


def write_results(out: Path, cfg: EvaluateConfig, files: dict[str, str], scores: dict[str, dict[str, list[float]]],
                  texts: list[str], seeds: list[int], index: list[int]) -> dict:
    """scores.parquet (one row per image), table.parquet + table.md (one row per model), grid.png."""
    per_image = {"model": [], "prompt": [], "prompt_index": [], "seed": []}
    per_image.update({name: [] for name in cfg.rewards})
    for m in cfg.models:
        per_image["model"] += [m.name] * len(texts)
        per_image["prompt"] += texts
        per_image["prompt_index"] += index
        per_image["seed"] += seeds
        for name in cfg.rewards:
            per_image[name] += scores[name][m.name]
    pq.write_table(pa.table(per_image), out / "scores.parquet")

    rows = summary_table(scores, [m.name for m in cfg.models])
    pq.write_table(pa.Table.from_pylist(rows), out / "table.parquet")
    from richpref.schemas.reward_titles import reward_titles

    titles = reward_titles({n: s.model_dump() for n, s in cfg.rewards.items()})
    markdown = to_markdown(rows, titles)
    (out / "table.md").write_text(markdown, encoding="utf-8")
    grid_path = None
    if cfg.grid_prompts > 0:
        grid_path = out / "grid.png"
        image_grid(files, index, cfg.grid_prompts, cfg.grid_cell).save(grid_path)
    return {"table": rows, "markdown": markdown, "grid": str(grid_path) if grid_path else None, "titles": titles}
