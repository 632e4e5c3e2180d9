"""Generative judges (`unified_reward`, `edit_score`): images scored per second in-process at batch
size 1, 8 and 32 and through `transformers serve` (launched by richpref on the CPU) at client
concurrency 1, 8 and 32, on the tiny Qwen2.5-VL with EditScore's tiny LoRA merged in.

    cd bench && HF_HUB_OFFLINE=1 RICHPREF_MODELS_ROOT=<tiny models> ../.venv/bin/python judges.py [--n 16] [--repeats 2]

An edit_score "image" is one edit judged (two questions: semantics and quality); a unified_reward
image is one question. Answers are `--tokens` long at most (greedy; the tiny judges rarely stop
early). Each repeat is timed after one warm-up call. Writes bench/results/judges-<commit>.json.
Figures only: a tiny model on a CPU says nothing about vLLM or SGLang on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from timing import scene  # noqa: E402

from richpref.models.rewards import load_reward  # noqa: E402
from richpref.schemas.serving import EngineConfig  # noqa: E402

SIZES = (1, 8, 32)


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--models-root", default=os.environ.get("RICHPREF_MODELS_ROOT"))
    args = ap.parse_args()
    if not args.models_root:
        sys.exit("give --models-root (or RICHPREF_MODELS_ROOT): a folder from `richpref models build-tiny`")
    torch.set_num_threads(1)
    os.environ.setdefault("RICHPREF_CACHE", tempfile.mkdtemp(prefix="judges-bench-"))
    root = Path(args.models_root)
    base, lora = str(root / "qwen2.5-vl"), str(root / "editscore-lora")
    imgs = [scene(i, 64) for i in range(args.n)]
    edits = [scene(i + 100, 64) for i in range(args.n)]
    prompts = [f"a yellow ball on a blue background, picture {i}" for i in range(args.n)]
    instructions = ["Make the ball red"] * args.n
    opts = dict(device="cpu", dtype="float32", max_new_tokens=args.tokens)

    launch = EngineConfig(backend="server", launch="transformers", startup_timeout_s=600, retries=1)
    served_edit = load_reward("edit_score", base, adapter=lora, engine=launch, **opts)
    merged = served_edit.vlm.model_id
    runs: list[dict] = []
    try:
        for reward in ("unified_reward", "edit_score"):
            local = (load_reward("unified_reward", merged, **opts) if reward == "unified_reward" else
                     load_reward("edit_score", base, adapter=lora, **opts))
            for backend in ("in-process", "served"):
                for size in SIZES:
                    if backend == "in-process":
                        judge = local
                    else:
                        engine = EngineConfig(backend="server", endpoint=served_edit.vlm.base_url, retries=1,
                                              served_model=served_edit.vlm.served_name, concurrency=size)
                        judge = (load_reward("unified_reward", merged, engine=engine, **opts)
                                 if reward == "unified_reward" else
                                 load_reward("edit_score", base, adapter=lora, engine=engine, **opts))

                    def call(j=judge, b=size):
                        if reward == "unified_reward":
                            return j.score(imgs, prompts, batch_size=b)
                        return j.score_edits(imgs, edits, instructions, batch_size=b)

                    call()  # warm-up
                    for r in range(args.repeats):
                        v = rate(call, args.n)
                        runs.append({"side": f"{reward}/{backend}/{size}", "repeat": r, "images_per_s": v})
                        print(f"{reward:15s} {backend:10s} {size:3d}: {v:7.2f} images/s", flush=True)
                    if judge is not local:
                        judge.close()
            local.close()
    finally:
        served_edit.close()

    sides = sorted({r["side"] for r in runs}, key=[r["side"] for r in runs].index)
    summary = {}
    for side in sides:
        vals = [r["images_per_s"] for r in runs if r["side"] == side]
        summary[f"{side}:images_per_s"] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {
        "bench": "judges", "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "repeats": args.repeats, "runs": runs, "summary": summary,
        "headline": {"name": "edit_score in-process images/s at batch 8",
                     "value": summary["edit_score/in-process/8:images_per_s"]["median"], "unit": "images/s",
                     "goal": None, "met": None},
    }
    dest = Path(__file__).resolve().parent / "results" / f"judges-{commit}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
