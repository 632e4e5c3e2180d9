"""The judges of 2025-26 on their tiny twins: images scored per second, in-process vs served, at
batch 1, 8 and 32 — one command for all four rewards.

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD .venv/bin/python bench/judges.py --models-root <tiny models> \\
        [--n 8] [--n-head 4] [--sizes 1,8,32] [--repeats 1] [--tokens 8]

- hpsv3, edit_reward (a reward head on a Qwen-VL): in-process, and through richpref's judge server
  (`engine.launch: richpref`, started by the reward on the CPU); the size is the model batch (in-process
  `batch_size`; served, the request's batch: one request per batch);
- unified_reward, edit_score (generative): in-process at that batch size, and through `transformers
  serve` (launched by richpref on the CPU, the EditScore LoRA merged) at that client concurrency
  (transformers serve answers one request at a time, so concurrency cannot help it).

An "image" is one image scored (hpsv3, unified_reward) or one edit judged (edit_reward: both heads;
edit_score: two questions). `--n` images for the generative judges, `--n-head` for the head judges
(each image brought to 256·28·28 pixels as the references do: 1024 vision patches, whatever the
input); a size above the count is one batch of the count. One warm-up call per (reward, backend);
answers at most `--tokens` long. Writes bench/results/judges-<commit>.json (bench/harness.py).
Figures only: tiny random weights on a CPU measure the code path, not the 7B models on a GPU.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from harness import Bench, headline, summarize  # noqa: E402
from timing import scene  # noqa: E402

from richpref.models.rewards import load_reward  # noqa: E402
from richpref.schemas.serving import EngineConfig  # noqa: E402

REWARDS = ("hpsv3", "edit_reward", "unified_reward", "edit_score")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-root", default=os.environ.get("RICHPREF_MODELS_ROOT"))
    ap.add_argument("--n", type=int, default=8, help="images per timed call, generative judges")
    ap.add_argument("--n-head", type=int, default=4, help="images per timed call, head judges (1024 patches each)")
    ap.add_argument("--sizes", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--rewards", default=",".join(REWARDS))
    args = ap.parse_args()
    if not args.models_root:
        sys.exit("give --models-root (or RICHPREF_MODELS_ROOT): a folder from `richpref models build-tiny`")
    torch.set_num_threads(1)
    if "RICHPREF_CACHE" not in os.environ:  # the merged LoRA judge: a cache of this run only, removed at exit
        os.environ["RICHPREF_CACHE"] = tempfile.mkdtemp(prefix="judges-bench-")
        atexit.register(shutil.rmtree, os.environ["RICHPREF_CACHE"], True)
    root = Path(args.models_root)
    sizes = [int(s) for s in args.sizes.split(",")]
    bench = Bench("judges", repeats=args.repeats)
    base, lora = str(root / "qwen2.5-vl"), str(root / "editscore-lora")
    gen = dict(device="cpu", dtype="float32", max_new_tokens=args.tokens)
    heads = {"hpsv3": dict(path=str(root / "hpsv3"), backbone=str(root / "hpsv3" / "base")),
             "edit_reward": dict(path=str(root / "edit-reward"), backbone=str(root / "edit-reward" / "base"))}

    def loader(reward: str, engine: EngineConfig | None):
        if reward in heads:
            h = heads[reward]
            return load_reward(reward, h["path"], backbone=h["backbone"], device="cpu", dtype="float32", engine=engine)
        if reward == "unified_reward":
            return load_reward("unified_reward", merged, engine=engine, **gen)
        return load_reward("edit_score", base, adapter=lora, engine=engine, **gen)

    def time_judge(reward: str, backend: str, judge_for) -> None:
        n = args.n_head if reward in heads else args.n
        imgs = [scene(i, 512 if reward in heads else 64) for i in range(n)]
        edits = [scene(i + 100, imgs[0].width) for i in range(n)]
        texts = [f"a yellow ball on a blue background, picture {i}" for i in range(n)]
        for k, size in enumerate(sizes):
            judge = judge_for(size)

            def call(j=judge, b=size, m=n):
                if reward in ("edit_reward", "edit_score"):
                    return j.score_edits(imgs[:m], edits[:m], texts[:m], batch_size=b)
                return j.score(imgs[:m], texts[:m], batch_size=b)

            if k == 0:
                call(m=min(n, 2))  # warm-up
            for r in range(args.repeats):
                t0 = time.perf_counter()
                call()
                v = n / (time.perf_counter() - t0)
                bench.runs.append({"side": f"{reward}/{backend}/{size}", "repeat": r, "images_per_s": v})
                print(f"{reward:15s} {backend:10s} {size:3d}: {v:7.3f} images/s ({n} images)", flush=True)

    wanted = args.rewards.split(",")
    served_edit = None
    merged = base
    if {"unified_reward", "edit_score"} & set(wanted):  # one transformers serve of the merged model for both
        launch = EngineConfig(backend="server", launch="transformers", startup_timeout_s=600, retries=1)
        served_edit = load_reward("edit_score", base, adapter=lora, engine=launch, **gen)
        merged = served_edit.vlm.model_id
    try:
        for reward in wanted:
            local = loader(reward, None)
            time_judge(reward, "in-process", lambda size: local)
            local.close()
            if reward in heads:
                served = loader(reward, EngineConfig(backend="server", launch="richpref", startup_timeout_s=600, retries=1))
                try:
                    time_judge(reward, "served", lambda size: served)
                finally:
                    served.close()
            else:
                clients = []

                def client(size: int, reward=reward):
                    engine = EngineConfig(backend="server", endpoint=served_edit.vlm.base_url, retries=1,
                                          served_model=served_edit.vlm.served_name, concurrency=size)
                    clients.append(loader(reward, engine))
                    return clients[-1]

                time_judge(reward, "served", client)
                for c in clients:
                    c.close()
    finally:
        if served_edit is not None:
            served_edit.close()

    med = {k.rsplit(".", 1)[0]: v["median"] for k, v in summarize(bench.runs).items()}
    key = "hpsv3/served/8"
    bench.write(headline("hpsv3 through richpref's judge server, images/s at batch 8", med.get(key), "images/s", None,
                         note=f"tiny twins on CPU, 1 torch thread; head judges {args.n_head} images, generative "
                              f"{args.n} images of {args.tokens} tokens per timed call"))
    print("\n| reward | backend | " + " | ".join(f"{s} (images/s)" for s in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for reward in wanted:
        for backend in ("in-process", "served"):
            cells = [f"{med[f'{reward}/{backend}/{s}']:.3g}" if f"{reward}/{backend}/{s}" in med else "—" for s in sizes]
            print(f"| {reward} | {backend} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
