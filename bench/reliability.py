"""Orchestration overhead, kill + resume cost and peak memory of the curate flow (now in
bench/curate_runs.py, on the harness: `overhead` and `resume` run its `resume`, `memory` its `memory`),
and --workers 2 vs 1 and --plan on heavy shards (not on the harness yet: one run each, no raw file).

    python bench/reliability.py overhead --items 1024      # = curate_runs.py resume: process wall / compute, kill + resume
    python bench/reliability.py memory --items 256 1024 4096  # = curate_runs.py memory: MiB per 1k items
    python bench/reliability.py workers --items 1024       # wall of --workers 2 / wall of --workers 1
    python bench/reliability.py plan --items 1024          # --plan on a finished run: 640x640 vs 64x64 images

Runs the tiny profile on the bundled prompts repeated to N items (a JSONL source written here), with
shard_size 32, in fresh data dirs under a temp dir. Goals (issue 8): overhead <= 1.15, re-run <= 0.05,
kill + resume <= 1.15, peak RSS(4096) / peak RSS(256) <= 1.10; (issue 12) workers 2 / 1 <= 0.60,
plan(640x640) / plan(64x64) <= 1.2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = (REPO / "richpref/data/demo_prompts.txt").read_text().splitlines()


def _source(dir_: Path, n: int) -> Path:
    path = dir_ / f"prompts-{n}.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"caption": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}) + "\n")
    return path


def _cmd(data: Path, run: str, n: int, models: str) -> list[str]:
    return [str(BIN / "richpref"), "--data-dir", str(data), "curate", "--run", run, "--models-root", models,
            "--set", "source.kind=jsonl", "--set", f"source.path={_source(data, n)}", "--set", "source.shard_size=32"]


def _env(data: Path, faults: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RICHPREF_FAULTS"}
    env.update(HF_HUB_OFFLINE="1", PREFECT_HOME=str(data / ".prefect"))
    if faults:
        env["RICHPREF_FAULTS"] = faults
    return env


def _timed(cmd, env) -> tuple[float, int]:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - t0, rc


def _compute_seconds(data: Path, run: str) -> float:
    log = data / "runs" / run / "_log" / "work.jsonl"
    return sum(json.loads(l)["compute_s"] for l in log.read_text().splitlines() if l.strip())


def _flow_wall(data: Path, run: str) -> float:
    log = data / "runs" / run / "_log" / "work.jsonl"
    recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    return max(r["at"] for r in recs) - min(r["at"] - r.get("wall_s", r["compute_s"]) for r in recs)


def workers(n: int, models: str) -> None:
    """The same run with one process and with a local Dask cluster of two workers (fresh data dirs)."""
    walls = {}
    for k in (1, 2):
        data = Path(tempfile.mkdtemp(prefix="richpref-bench-"))
        walls[k], rc = _timed(_cmd(data, f"workers{k}", n, models) + ["--workers", str(k)], _env(data))
        assert rc == 0, f"curate --workers {k} failed"
        print(f"items {n}: --workers {k}: process wall {walls[k]:.1f}s, flow wall {_flow_wall(data, f'workers{k}'):.1f}s, "
              f"sum of stage compute {_compute_seconds(data, f'workers{k}'):.1f}s")
    print(f"wall(--workers 2) / wall(--workers 1): {walls[2] / walls[1]:.3f}")


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


def plan(n: int, models: str) -> None:
    """`curate --plan` on a finished run with 64x64 images, then on the same run with 640x640 images."""
    from timing import best_of

    data = Path(tempfile.mkdtemp(prefix="richpref-bench-"))
    wall, rc = _timed(_cmd(data, "small", n, models), _env(data))
    assert rc == 0, "curate failed"
    import shutil

    shutil.copytree(data / "runs" / "small", data / "runs" / "big")
    sizes = {"small": sum(p.stat().st_size for p in (data / "runs" / "small").rglob("*.parquet")),
             "big": _upscale_images(data, "big", 640)}
    os.environ["HF_HUB_OFFLINE"] = "1"
    from richpref.run.plan import plan_run
    from richpref.schemas.config import load_profile

    cmd = _cmd(data, "small", n, models)
    overrides = [cmd[i + 1] for i, x in enumerate(cmd) if x == "--set"]
    profile = load_profile("tiny", overrides, models)
    times, walls = {}, {}
    for run in ("small", "big"):
        assert plan_run(profile, str(data), run).up_to_date, run
        times[run] = best_of(5, lambda: plan_run(profile, str(data), run))
        walls[run], rc = _timed(_cmd(data, run, n, models) + ["--plan"], _env(data))
        assert rc == 0
        print(f"items {n}, run {run}: {sizes[run] / 2**20:.0f} MiB of shards; plan {times[run] * 1000:.0f} ms "
              f"(best of 5, in process); `richpref curate --plan` process wall {walls[run]:.1f}s")
    print(f"plan(640x640) / plan(64x64): {times['big'] / times['small']:.3f} in process, "
          f"{walls['big'] / walls['small']:.3f} process wall")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "resume", "memory", "workers", "plan"])
    ap.add_argument("--items", type=int, nargs="+", default=[1024])
    ap.add_argument("--models", default=str(REPO / "data/models/tiny"))
    a = ap.parse_args()
    if a.what in ("overhead", "resume", "memory"):
        # On the harness (bench/curate_runs.py): repeats, alternated sides, fresh Prefect homes, raw results.
        import curate_runs

        items = [str(n) for n in a.items]
        return curate_runs.main(["resume" if a.what != "memory" else "memory", "--models", a.models, "--items", *items])
    if a.what == "workers":
        workers(a.items[0], a.models)
    elif a.what == "plan":
        plan(a.items[0], a.models)


if __name__ == "__main__":
    main()
