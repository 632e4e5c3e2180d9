"""`richpref curate` as a user runs it, every run a fresh process with its own Prefect home and caches.

    python bench/curate_runs.py resume [--items 1024] [--repeats 3]     # flow overhead and kill + resume
    python bench/curate_runs.py memory [--items 256 1024 4096]          # MiB per 1k items above the post-import baseline
    python bench/curate_runs.py resume --quick | memory --quick          # small sizes, `--until sample`

A --quick run is recorded as <name>_quick (flow_overhead_quick, memory_quick, ...) without its goal:
at 8 items the process and Prefect starts are most of it, not what the goals name.

resume: three sides alternated each repeat, each in a fresh data dir and Prefect home:
  full     one uninterrupted run: process wall, sum of stage compute (the shards' work log, and the model
           loaded ahead of its stage's first shard while the Prefect server starts, its thread's CPU
           seconds: _log/loads.jsonl), process wall / compute;
           then the same command again on the finished run (re-run / first run, goal <= 0.05)
  between  SIGKILL before a shard of the middle of a stage (RICHPREF_FAULTS kill: the shards before it
           committed), then a second process resumes: (killed wall + resume wall) / the same repeat's full wall
  inside   SIGKILL half-way through a shard's computation (the harness watches the log for the shard
           before it, waits half that shard's compute time, then kills the process), then resume
Headlines: flow_overhead = process wall / compute (process start, imports, Prefect start and the plan
included; goal <= 1.15); kill_resume_between and kill_resume_inside (goal <= 1.15).

memory: one run per size, alternated order; the curate process's peak RSS (wait4) and the post-import
baseline: the peak RSS of `richpref curate --plan` on the same source (imports, profile, plan; no model).
Headline: the slope of peak RSS over items (least squares over the sizes), in MiB per 1000 items.
Every memory run reports to one Prefect server the bench starts (PREFECT_API_URL): the measure is the
curate process's peak RSS, which a server of its own (a separate, smaller process) does not change,
and each run is spared that server's start.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import harness

REPO = harness.REPO
BIN = Path(sys.executable).parent
PROMPTS = (REPO / "richpref/data/demo_prompts.txt").read_text().splitlines()
GOAL = "<= 1.15"
# A --quick run (8 items, --until sample) is a smoke run: one process start, Prefect's start and a model
# load are most of it, so its figures are not the quantities the goals name (set for the full size).
# It is recorded as <name>_quick, without the goal, so the report's newest <name> stays a full-size run.
QUICK_NOTE = "; quick size: a smoke run, the goal is set for the full size"


def record_name(a, name: str) -> str:
    return f"{name}_quick" if a.quick else name


def goal_of(a, goal: str) -> str | None:
    return None if a.quick else goal


def source_file(dir_: Path, n: int) -> Path:
    path = dir_ / f"prompts-{n}.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"caption": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}) + "\n")
    return path


def curate_cmd(data: Path, src: Path, a) -> list[str]:
    cmd = [str(BIN / "richpref"), "--data-dir", str(data), "curate", "--run", "r", "--models-root", a.models,
           "--set", "source.kind=jsonl", "--set", f"source.path={src}", "--set", f"source.shard_size={a.shard_size}"]
    return cmd + (["--until", a.until] if a.until else [])


def work_log(data: Path) -> list[dict]:
    log = data / "runs" / "r" / "_log" / "work.jsonl"
    return [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.exists() else []


def loads_ahead(data: Path) -> list[dict]:
    log = data / "runs" / "r" / "_log" / "loads.jsonl"
    return [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.exists() else []


def compute_s(data: Path) -> float:
    """The stages' compute: every shard's, and a model load a stage did before its first shard. That
    load ran beside the Prefect server's start: its wall counts their contention for the cores, its
    thread's CPU seconds do not (nor any other thread's work for it): the smaller figure is counted."""
    return (sum(r["compute_s"] for r in work_log(data))
            + sum(min(r["load_s"], r["thread_cpu_s"]) for r in loads_ahead(data)))


def _kill_inside(cmd: list[str], env: dict, stage: str, shard: int, timeout: float) -> dict:
    """Run cmd; once shard `shard - 1` of `stage` is logged done, SIGKILL the process half-way through
    the next shard (half the logged compute time of the one before)."""
    pat = re.compile(rf"{stage} shard {shard - 1:05d}: \d+ rows in ([0-9.]+)s")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fired = {}

    def watch():
        for line in proc.stdout:
            m = pat.search(line)
            if m and not fired:
                fired["after_s"] = float(m.group(1)) / 2
                time.sleep(fired["after_s"])
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    th.join(5)
    return {"wall_s": time.perf_counter() - t0, "rc": rc, "kill_after_s": fired.get("after_s")}


def resume(a) -> None:
    b = harness.Bench("curate_resume", a.repeats)
    shards = (a.items + a.shard_size - 1) // a.shard_size
    k = max(1, shards // 2)

    def side(name: str, rep: int) -> dict:
        root, env = b.fresh(f"{name}{rep}")
        data = root / "data"
        cmd = curate_cmd(data, source_file(root, a.items), a)
        if name == "full":
            r = harness.run_process(cmd, env, a.timeout)
            assert r["rc"] == 0, f"curate failed:\n{r['stderr'][-3000:]}"
            c = compute_s(data)
            again = harness.run_process(cmd, env, a.timeout)  # the finished run again: the plan only, no Prefect
            assert again["rc"] == 0, again["stderr"][-2000:]
            return {"wall_s": r["wall_s"], "compute_s": c, "wall_over_compute": r["wall_s"] / c, "maxrss_mib": r["maxrss_mib"],
                    "rerun_wall_s": again["wall_s"], "rerun_over_first": again["wall_s"] / r["wall_s"]}
        if name == "between":
            killed = harness.run_process(cmd, {**env, "RICHPREF_FAULTS": f"{a.kill_stage}:{k}:kill"}, a.timeout)
            assert killed["rc"] == -9, f"expected SIGKILL, got {killed['rc']}:\n{killed['stderr'][-2000:]}"
        else:
            killed = _kill_inside(cmd, env, a.kill_stage, k, a.timeout)
            assert killed["rc"] == -9, f"the kill inside shard {k} missed (rc {killed['rc']})"
        done_before = len(work_log(data))
        r = harness.run_process(cmd, env, a.timeout)
        assert r["rc"] == 0, f"resume failed:\n{r['stderr'][-3000:]}"
        return {"killed_wall_s": killed["wall_s"], "resume_wall_s": r["wall_s"],
                "wall_s": killed["wall_s"] + r["wall_s"], "shards_done_before_kill": done_before}

    runs = b.alternate(["full", "between", "inside"], side)
    full = [r for r in runs if r["side"] == "full"]
    over = [{"side": "full", "repeat": r["repeat"], **{x: r[x] for x in ("wall_s", "compute_s", "wall_over_compute",
                                                                          "rerun_wall_s", "rerun_over_first")}}
            for r in full]
    s = harness.summarize(over)
    quick = QUICK_NOTE if a.quick else ""
    b.write(harness.headline("wall_over_compute", s["wall_over_compute"]["median"], "x", goal_of(a, GOAL),
                             note=f"process wall / sum of stage compute (models loaded ahead included), {a.items} items, shard size {a.shard_size}"
                                  + (f", --until {a.until}" if a.until else "") + quick),
            runs=over, name=record_name(a, "flow_overhead"))
    b.write(harness.headline("rerun_over_first", s["rerun_over_first"]["median"], "x", goal_of(a, "<= 0.05"),
                             note="`richpref curate` again on the finished run (process wall) / the first run's "
                                  "process wall" + quick),
            runs=over, name=record_name(a, "rerun_finished"))
    for which in ("between", "inside"):
        sel = [r for r in runs if r["side"] in ("full", which)]
        rat = harness.ratios(sel, (which, "wall_s"), ("full", "wall_s"), "kill_resume_over_full")
        s = harness.summarize(rat)
        where = f"{a.kill_stage} shard {k} of {shards}"
        b.write(harness.headline("kill_resume_over_full", s["kill_resume_over_full"]["median"], "x", goal_of(a, GOAL),
                                 note=f"(killed + resume process walls) / uninterrupted, kill {which} shards "
                                      f"({where}), {a.items} items" + (f", --until {a.until}" if a.until else "")
                                      + (QUICK_NOTE if a.quick else "")),
                runs=sel + rat, name=record_name(a, f"kill_resume_{which}"))
    b.cleanup()


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


@contextlib.contextmanager
def prefect_server():
    """A Prefect API server in a fresh folder, as `richpref curate` starts its own; yields its URL."""
    import shutil
    import tempfile

    import socket

    from richpref.common.procs import spawn_owned, stop_owned, wait_healthy
    from richpref.ops.prefect_api import server_command

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(tempfile.mkdtemp(prefix="richpref-bench-prefect-"))
    env = harness.fresh_env(root, PREFECT_UI_ENABLED="0", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = spawn_owned(server_command(port), name="prefect-server", env=env, log_path=str(root / "server.log"))
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, "the Prefect server", proc, timeout=120, poll_s=0.2)
        yield url
    finally:
        stop_owned(proc)
        shutil.rmtree(root, ignore_errors=True)


def memory(a) -> None:
    sides = [str(n) for n in a.items]
    base: dict = {}

    def side(b: harness.Bench, name: str, rep: int) -> dict:
        if not base:  # the post-import baseline: `curate --plan` imports what a run imports, reads the profile and plans
            root, env = b.fresh("baseline")
            base.update(harness.run_process(curate_cmd(root / "data", source_file(root, a.items[0]), a) + ["--plan"],
                                            env, a.timeout))
            assert base["rc"] == 0, base["stderr"][-2000:]
            base["server"] = stack.enter_context(prefect_server())
        n = int(name)
        root, env = b.fresh(f"mem{n}-{rep}", PREFECT_API_URL=base["server"])
        data = root / "data"
        src = source_file(root, n)
        r = harness.run_process(curate_cmd(data, src, a), env, a.timeout)
        assert r["rc"] == 0, r["stderr"][-3000:]
        return {"items": n, "peak_rss_mib": r["maxrss_mib"], "baseline_rss_mib": base["maxrss_mib"],
                "above_baseline_mib": r["maxrss_mib"] - base["maxrss_mib"], "wall_s": r["wall_s"]}

    def per_repeat(runs: list[dict]) -> list[dict]:
        return [{"side": "derived", "repeat": rep,
                 "mib_per_1k_items": 1000 * slope([r["items"] for r in runs if r["repeat"] == rep],
                                                  [r["peak_rss_mib"] for r in runs if r["repeat"] == rep])}
                for rep in range(a.repeats)]

    with contextlib.ExitStack() as stack:  # started with the first run, stopped after the last
        harness.run(record_name(a, "memory"), a.repeats, sides, "mib_per_1k_items", "MiB per 1k items",
                    goal_of(a, a.goal_mib), side=side, extra_runs=per_repeat,
                    note=f"slope of the curate process's peak RSS over {', '.join(sides)} items (least squares, "
                         "per repeat); each size's RSS above its `curate --plan` baseline is in the runs; every run "
                         "reports to one Prefect server started by the bench" + (f"; --until {a.until}" if a.until else "")
                         + (QUICK_NOTE if a.quick else ""))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["resume", "memory"])
    p.add_argument("--quick", action="store_true", help="small sizes: --until sample, 8 items (memory 2 4 8), N=2")
    p.add_argument("--items", type=int, nargs="+")
    p.add_argument("--shard-size", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--until", default=None, help="curate --until STAGE")
    p.add_argument("--kill-stage", default=None)
    p.add_argument("--models", default=os.environ.get("RICHPREF_MODELS_ROOT", str(REPO / "data/models/tiny")))
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--goal-mib", default="<= 40",
                   help="memory goal in MiB per 1000 items (the old 10%% of ~1.6 GiB over 3840 more items)")
    a = p.parse_args(argv)
    if a.quick:
        a.until = a.until or "sample"
        # resume: 4 shards, so the kill inside lands in shard 2, timed from shard 1 (shard 0 loads the model)
        a.items = a.items or ([8] if a.what == "resume" else [2, 4, 8])
        a.shard_size = a.shard_size or 2
        # N=2 here: each repeat is 3-9 fresh curate processes, and the quick set must fit 15 minutes
        a.repeats = a.repeats or 2
    a.items = a.items or ([1024] if a.what == "resume" else [256, 1024, 4096])
    a.shard_size = a.shard_size or 32
    a.repeats = a.repeats or 3
    a.kill_stage = a.kill_stage or (a.until if a.until in ("sample", "critique", "instruct", "edit") else "edit")
    if a.what == "resume":
        a.items = a.items[0]
        resume(a)
    else:
        memory(a)


if __name__ == "__main__":
    main()
