"""Orchestration overhead, kill + resume cost and peak memory of the curate flow (now in
bench/curate_runs.py, on the harness: `overhead` and `resume` run its `resume`, `memory` its `memory`),
and --workers 2 vs 1 and --plan on heavy shards (on the harness too: bench/results/workers-<commit>.json,
bench/results/plan_heavy_shards-<commit>.json).

    python bench/reliability.py overhead --items 1024      # = curate_runs.py resume: process wall / compute, kill + resume
    python bench/reliability.py memory --items 256 1024 4096  # = curate_runs.py memory: MiB per 1k items
    python bench/reliability.py workers --items 1024       # wall of --workers 2 / wall of --workers 1, CPU seconds
    python bench/reliability.py plan --items 1024          # --plan on a finished run: 640x640 vs 64x64 images

Runs the tiny profile on the bundled prompts repeated to N items (a JSONL source written here), with
shard_size 32, in fresh data dirs under a temp dir. Goals (issue 8): overhead <= 1.15, re-run <= 0.05,
kill + resume <= 1.15; (issue 24) workers 2 / 1 <= 0.80 on a 2-core machine; (issue 12)
plan(640x640) / plan(64x64) <= 1.2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import harness

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = (REPO / "richpref/data/demo_prompts.txt").read_text().splitlines()


def _source(dir_: Path, n: int) -> Path:
    path = dir_ / f"prompts-{n}.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"caption": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}) + "\n")
    return path


def _cmd(data: Path, run: str, n: int, models: str, shard_size: int = 32) -> list[str]:
    return [str(BIN / "richpref"), "--data-dir", str(data), "curate", "--run", run, "--models-root", models,
            "--set", "source.kind=jsonl", "--set", f"source.path={_source(data, n)}",
            "--set", f"source.shard_size={shard_size}"]


def _work(data: Path, run: str) -> list[dict]:
    log = data / "runs" / run / "_log" / "work.jsonl"
    return [json.loads(l) for l in log.read_text().splitlines() if l.strip()]


def _cpu_accounting(data: Path, run: str, process_cpu_s: float) -> dict:
    """CPU seconds, which the load of other jobs does not inflate as it does walls: the shards' (their
    processes' CPU while each computed), the rest of the command's (start, Prefect, Dask, planning,
    export), per stage; the worker processes, their torch threads, and their model loads and swaps."""
    work = _work(data, run)
    shard_cpu = sum(r.get("cpu_s", 0.0) for r in work)
    out = {"cpu_s": process_cpu_s, "shard_cpu_s": shard_cpu, "other_cpu_s": process_cpu_s - shard_cpu,
           "shard_processes": len({r.get("pid") for r in work}),
           "torch_threads": max((r.get("torch_threads") or 0) for r in work)}
    for r in work:
        key = f"cpu_{r['stage']}_s"
        out[key] = out.get(key, 0.0) + r.get("cpu_s", 0.0)
    models = json.loads((data / "runs" / run / "run.json").read_text()).get("models") or {}
    out.update({f"model_{k}": v for k, v in models.items() if k in ("loads", "swaps")})
    return out


def _compute_seconds(data: Path, run: str) -> float:
    log = data / "runs" / run / "_log" / "work.jsonl"
    return sum(json.loads(l)["compute_s"] for l in log.read_text().splitlines() if l.strip())


def _flow_wall(data: Path, run: str) -> float:
    log = data / "runs" / run / "_log" / "work.jsonl"
    recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    return max(r["at"] for r in recs) - min(r["at"] - r.get("wall_s", r["compute_s"]) for r in recs)


def workers(n: int, models: str, repeats: int, shard_size: int | None = None, doctor_json: str | None = None) -> None:
    """The same run with one process and with a local Dask cluster of two workers, each a fresh process
    in a fresh data dir (own Prefect home and caches), alternated per repeat. The shard size is 32, or
    n / 4 for fewer than 128 items: with one shard per stage the second worker has nothing to do.
    `doctor_json`: the two-worker run's live dispatch starts from this `richpref doctor --json` table."""
    b = harness.Bench("workers", repeats)
    size = shard_size or max(1, min(32, n // 4))

    def side(k: str, rep: int) -> dict:
        data, env = b.fresh(f"{k}-{rep}")
        table = ["--doctor-json", doctor_json] if doctor_json and k == "w2" else []
        r = harness.run_process(_cmd(data, "w", n, models, size) + ["--workers", k[1:]] + table, env, timeout=7200)
        assert r["rc"] == 0, f"curate --workers {k[1:]} failed:\n{r['stderr'][-3000:]}"
        return {"wall_s": r["wall_s"], "flow_wall_s": _flow_wall(data, "w"), "compute_s": _compute_seconds(data, "w"),
                **_cpu_accounting(data, "w", r["cpu_s"])}

    b.alternate(["w1", "w2"], side)
    runs = b.runs + harness.ratios(b.runs, ("w2", "wall_s"), ("w1", "wall_s"), "w2_over_w1")
    runs += harness.ratios(b.runs, ("w2", "cpu_s"), ("w1", "cpu_s"), "w2_over_w1_cpu")
    runs += harness.ratios(b.runs, ("w2", "shard_cpu_s"), ("w1", "shard_cpu_s"), "w2_over_w1_shard_cpu")
    s = harness.summarize(runs)
    b.write(harness.headline("w2_over_w1", s["w2_over_w1"]["median"], "x", "<= 0.80",
                             note=f"process wall of `richpref curate --workers 2` (a local Dask cluster) / `--workers 1`, "
                                  f"tiny profile, {n} items, shard size {size}, on {os.cpu_count()} cores; CPU "
                                  f"seconds of each command and its children (cpu_s), of its shards (shard_cpu_s) "
                                  f"and the rest (other_cpu_s), which load inflates less than walls; the two-worker "
                                  f"dispatch starts from {doctor_json or 'the built-in doctor table'}"),
            runs=runs)
    b.cleanup()


def _upscale_images(data: Path, run: str, side: int) -> int:
    """Rewrite every shard of a finished run with its images re-encoded at side x side (noise added so
    PNG cannot shrink them), under the same content keys: the run is as finished as before, only
    heavier. Returns the run's bytes on disk."""
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from richpref.run.runner import stage_manifests, write_shard
    from richpref.run.storage import RunStore
    from richpref.tasks import OUTPUTS

    store, rng = RunStore(str(data), run), np.random.default_rng(0)

    def big(png: bytes | None) -> bytes | None:
        if png is None:
            return None
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize((side, side)), dtype=np.int16)
        img = np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue()

    for out in OUTPUTS:
        for shard, m in stage_manifests(store, out).items():
            table = store.read_shard(out, shard)
            for i, field in enumerate(table.schema):
                if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
                    table = table.set_column(i, field, pa.array([big(v) for v in table.column(i).to_pylist()], field.type))
            write_shard(store, out, shard, table.replace_schema_metadata(None), m.key)
    return sum(p.stat().st_size for p in Path(store.root).rglob("*.parquet"))


def plan(n: int, models: str, repeats: int) -> None:
    """`curate --plan` on a finished run with 64x64 images and on the same run with 640x640 images: the
    process walls (fresh processes, alternated per repeat) and the in-process plan time."""
    import shutil

    from timing import best_of

    b = harness.Bench("plan_heavy_shards", repeats)
    data, env = b.fresh("data")
    r = harness.run_process(_cmd(data, "small", n, models), env, timeout=7200)
    assert r["rc"] == 0, f"curate failed:\n{r['stderr'][-3000:]}"
    shutil.copytree(data / "runs" / "small", data / "runs" / "big")
    sizes = {"small": sum(p.stat().st_size for p in (data / "runs" / "small").rglob("*.parquet")),
             "big": _upscale_images(data, "big", 640)}
    os.environ["HF_HUB_OFFLINE"] = "1"
    from richpref.run.plan import plan_run
    from richpref.schemas.config import load_profile

    cmd = _cmd(data, "small", n, models)
    profile = load_profile("tiny", [cmd[i + 1] for i, x in enumerate(cmd) if x == "--set"], models)

    def side(run: str, rep: int) -> dict:
        assert plan_run(profile, str(data), run).up_to_date, run
        _, e = b.fresh(f"{run}-{rep}")
        r = harness.run_process(_cmd(data, run, n, models) + ["--plan"], e)
        assert r["rc"] == 0, r["stderr"][-3000:]
        return {"process_wall_s": r["wall_s"], "in_process_s": best_of(3, lambda: plan_run(profile, str(data), run)),
                "shards_mib": sizes[run] / 2**20}

    b.alternate(["small", "big"], side)
    runs = b.runs + harness.ratios(b.runs, ("big", "process_wall_s"), ("small", "process_wall_s"), "big_over_small")
    runs += harness.ratios(b.runs, ("big", "in_process_s"), ("small", "in_process_s"), "big_over_small_in_process")
    s = harness.summarize(runs)
    b.write(harness.headline("big_over_small", s["big_over_small"]["median"], "x", "<= 1.2",
                             note=f"`richpref curate --plan` process wall on a finished run of {n} items with 640x640 "
                                  f"images / with 64x64 images (in process, best of 3: big_over_small_in_process)"),
            runs=runs)
    b.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "resume", "memory", "workers", "plan"])
    ap.add_argument("--items", type=int, nargs="+", default=[1024])
    ap.add_argument("--models", default=str(REPO / "data/models/tiny"))
    ap.add_argument("--repeats", type=int, default=3, help="workers and plan: fresh processes, sides alternated")
    ap.add_argument("--shard-size", type=int, default=None, help="workers: default 32, or items / 4 below 128 items")
    ap.add_argument("--doctor-json", default=None, help="workers: the --workers 2 run's plan weighs this doctor table")
    a = ap.parse_args()
    if a.what in ("overhead", "resume", "memory"):
        # On the harness (bench/curate_runs.py): repeats, alternated sides, fresh Prefect homes, raw results.
        import curate_runs

        items = [str(n) for n in a.items]
        return curate_runs.main(["resume" if a.what != "memory" else "memory", "--models", a.models, "--items", *items])
    if a.what == "workers":
        workers(a.items[0], a.models, a.repeats, a.shard_size, a.doctor_json)
    elif a.what == "plan":
        plan(a.items[0], a.models, a.repeats)


if __name__ == "__main__":
    main()
