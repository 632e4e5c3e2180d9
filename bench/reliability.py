"""Orchestration overhead, re-run cost, kill + resume cost and peak memory of the curate flow.

    python bench/reliability.py overhead --items 1024      # wall / sum of stage compute, and re-run / first run
    python bench/reliability.py resume --items 1024        # (SIGKILL mid-run + resume) / uninterrupted wall
    python bench/reliability.py memory --items 256 4096    # peak RSS of a curate process per size

Runs the tiny profile on the bundled prompts repeated to N items (a JSONL source written here), with
shard_size 32, in fresh data dirs under a temp dir. Goals (issue 8): overhead <= 1.15, re-run <= 0.05,
kill + resume <= 1.15, peak RSS(4096) / peak RSS(256) <= 1.10.
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


def overhead(n: int, models: str) -> None:
    data = Path(tempfile.mkdtemp(prefix="richpref-bench-"))
    wall, rc = _timed(_cmd(data, "first", n, models), _env(data))
    assert rc == 0, "curate failed"
    compute = _compute_seconds(data, "first")
    flow = _flow_wall(data, "first")
    rerun, rc = _timed(_cmd(data, "first", n, models), _env(data))
    assert rc == 0, "re-run failed"
    # The same re-run through the flow (what a deployment run of a finished run costs): Prefect start,
    # one cached task per shard and stage.
    flow_rerun, rc = _timed(_cmd(data, "first", n, models) + ["--force-flow"], _env(data))
    assert rc == 0, "re-run through the flow failed"
    print(f"items {n}: process wall {wall:.1f}s, flow wall (first shard start -> last shard end) {flow:.1f}s, "
          f"sum of stage compute {compute:.1f}s")
    print(f"orchestration overhead (flow wall / compute): {flow / compute:.3f}   (process wall / compute: {wall / compute:.3f})")
    print(f"re-run of the finished run: {rerun:.1f}s, re-run / first run: {rerun / wall:.3f}")
    print(f"re-run through the flow (--force-flow): {flow_rerun:.1f}s, / first run: {flow_rerun / wall:.3f}")


def resume(n: int, models: str) -> None:
    data = Path(tempfile.mkdtemp(prefix="richpref-bench-"))
    full, rc = _timed(_cmd(data, "full", n, models), _env(data))
    assert rc == 0
    shards = (n + 31) // 32
    fault = f"edit:{shards // 2}:kill"
    killed, rc = _timed(_cmd(data, "killed", n, models), _env(data, fault))
    assert rc == -9, f"expected SIGKILL, got {rc}"
    resumed, rc = _timed(_cmd(data, "killed", n, models), _env(data))
    assert rc == 0
    print(f"items {n}: uninterrupted {full:.1f}s; killed at {fault} after {killed:.1f}s, resume {resumed:.1f}s")
    print(f"(kill + resume) / uninterrupted: {(killed + resumed) / full:.3f}")


def memory(sizes: list[int], models: str) -> None:
    peaks = {}
    for n in sizes:
        data = Path(tempfile.mkdtemp(prefix="richpref-bench-"))
        code = ("import resource, subprocess, sys; "
                f"rc = subprocess.run({_cmd(data, 'mem', n, models)!r}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
                "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code], env=_env(data), capture_output=True, text=True).stdout.split()
        assert out[0] == "0", "curate failed"
        peaks[n] = int(out[1]) / 1024
        print(f"items {n}: peak RSS of the curate process {peaks[n]:.0f} MiB")
    if len(sizes) >= 2:
        print(f"peak RSS({sizes[-1]}) / peak RSS({sizes[0]}): {peaks[sizes[-1]] / peaks[sizes[0]]:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["overhead", "resume", "memory"])
    ap.add_argument("--items", type=int, nargs="+", default=[1024])
    ap.add_argument("--models", default=str(REPO / "data/models/tiny"))
    a = ap.parse_args()
    if a.what == "overhead":
        overhead(a.items[0], a.models)
    elif a.what == "resume":
        resume(a.items[0], a.models)
    else:
        memory(a.items, a.models)


if __name__ == "__main__":
    main()
