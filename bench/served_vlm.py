"""Served VLM stages vs in-process, and what the filter's shared prefixes save, on the tiny VLMs.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/served_vlm.py [--n 32] [--repeats 2] [--concurrency 1 8 32]

1. Items/s of `critique_rows`, `instruct_rows` and `filter_rows` through `transformers serve` (launched
   by richpref on the CPU, one server per model) at client concurrency 1, 8 and 32, and in-process at
   batch size 1, 8 and 32; one timed call per side after a warm-up, tiny-profile settings. Figures
   only: a tiny model on a CPU says little about vLLM on a GPU.
2. Filter cost per pair, CALCULATED (not measured) from the requests the stage would send, with 5
   attributes per item assumed and a perfect prefix cache on the server; bench/filter_encodings.py
   measures the in-process count with a hook on the vision tower: model passes (one per question),
   prompt tokens, and image encodings without a prefix cache (one per question) and with one (one per
   distinct image+chat prefix, since a pair's questions about one image share it). Goal: >= 3x fewer
   image encodings per pair.

On the harness: each repeat a fresh process (servers started once in it) that times the sides
(backend x concurrency) in alternated order; raw runs go to bench/results/served_vlm-<commit>.json.
Headline: the calculated encodings saving (labelled calculated).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import harness  # noqa: E402
from vlm_stages import PROMPTS, _png  # noqa: E402

from richpref.schemas.config import CheckConfig, CritiqueConfig, FilterConfig, InstructConfig  # noqa: E402
from richpref.schemas.serving import EngineConfig  # noqa: E402
from richpref.tasks import filter as filter_stage  # noqa: E402
from richpref.tasks import check as check_stage  # noqa: E402
from richpref.tasks.critique import critique_rows  # noqa: E402
from richpref.tasks.instruct import instruct_rows  # noqa: E402


def prefix_counts(local, questions) -> tuple[int, int, int]:
    """(prompt tokens, prompt tokens computed with a prefix cache, distinct image prefixes) of
    questions [(image, text)] sent in this order: a question reuses the longest prefix it shares with
    an earlier question about the same image."""
    total = cached = 0
    seen: dict[int, list[list[int]]] = {}
    for img, text in questions:
        ids = local._encode([img], [text])["input_ids"][0].tolist()
        total += len(ids)
        best = 0
        for prev in seen.get(id(img), []):
            k = 0
            while k < min(len(ids), len(prev)) and ids[k] == prev[k]:
                k += 1
            best = max(best, k)
        cached += len(ids) - best
        seen.setdefault(id(img), []).append(ids)
    return total, cached, len(seen)


def sides_of(concurrency) -> list[str]:
    return [f"{backend}.c{c}" for c in concurrency for backend in ("server", "inproc")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--models-root", default=None)
    args = harness.child_args(ap, repeats=3).parse_args()
    if args.child:
        return child(args)
    sides = sides_of(args.concurrency)

    def derive(res: dict) -> dict:
        out = dict(res["filter_cost"])
        top = args.concurrency[-1]
        for k, v in res[f"inproc.c{top}"].items():
            if k.endswith(".items_per_s") and res[f"server.c{top}"].get(k):
                out[k.replace(".items_per_s", f".inproc_over_server_c{top}")] = v / res[f"server.c{top}"][k]
        return out

    harness.run("served_vlm", args.repeats, sides, "server_fewer_encodings", "x", ">= 3", script=__file__,
                args=harness.child_argv(sys.argv[1:]), derive=derive, kind="calculated",
                note=f"filter: image encodings per pair without / with a server's prefix cache, CALCULATED "
                     f"from the requests the stage sends (a perfect prefix cache and 5 attributes per item "
                     f"assumed; bench/filter_encodings.py measures the in-process count); beside it, "
                     f"items/s of critique, instruct and filter through `transformers serve` on the CPU at "
                     f"client concurrency {', '.join(map(str, args.concurrency))} and in process at those "
                     f"batch sizes, {args.n} items, one timed call per side after a warm-up")


def child(args) -> None:
    from richpref.models.tiny import LAYOUT
    from richpref.models.tiny.vlm import build_tiny_llava_onevision, build_tiny_qwen2_5_vl
    from richpref.models.vlm import VisionLanguageModel
    from richpref.models.vlm_client import connect

    tmp = tempfile.TemporaryDirectory()
    if args.models_root:
        critic_dir, qwen_dir = Path(args.models_root) / LAYOUT["critic"], Path(args.models_root) / LAYOUT["vlm"]
    else:
        critic_dir = build_tiny_llava_onevision(Path(tmp.name) / "critic", seed=2)
        qwen_dir = build_tiny_qwen2_5_vl(Path(tmp.name) / "qwen", seed=3)
    launch = EngineConfig(backend="server", launch="transformers", startup_timeout_s=300)
    servers = {"critic": connect(launch, str(critic_dir), device="cpu"), "qwen": connect(launch, str(qwen_dir), device="cpu")}
    local = {"critic": VisionLanguageModel.load(str(critic_dir), device="cpu"),
             "qwen": VisionLanguageModel.load(str(qwen_dir), device="cpu")}

    n = args.n
    ids = [f"item{k:04d}" for k in range(n)]
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(n)]
    images = [_png(k) for k in range(n)]
    critique_in = pa.table({"item_id": ids, "prompt": prompts})
    instruct_in = pa.table({"item_id": ids, "prompt": prompts, "critique": ["The image misses parts of the prompt."] * n})
    instructions = [["Change the colour of the main object", "Remove the extra object on the left"]] * n
    filter_images = {"original": images, "edited": [_png(1000 + k) for k in range(n)],
                     "original_cutout": [_png(2000 + k) for k in range(n)], "edited_cutout": [_png(3000 + k) for k in range(n)]}
    pairs = pa.table({"item_id": ids, "candidate": [0] * n})

    def stages(bs: int, vlms: dict):
        c = CritiqueConfig(max_new_tokens=24, batch_size=bs)
        i = InstructConfig(max_new_tokens=24, batch_size=bs, min_grounding=0, drop_truncated=False, min_visible=0.3)
        ch = CheckConfig(max_new_tokens=24, batch_size=bs)
        f = FilterConfig(min_executed=0.522, min_no_stray=0.3, min_subject_kept=0.3, min_attribute_present=0.517,
                         min_attributes_kept=0.5)
        return {
            "critique": lambda: critique_rows(critique_in, images, c, lambda: vlms["critic"]),
            "instruct": lambda: instruct_rows(instruct_in, images, i, lambda: vlms["qwen"]),
            "filter": lambda: filter_stage.filter_rows(pairs, prompts, instructions, filter_images, ch, f, lambda: vlms["qwen"]),
        }

    out: dict[str, dict] = {side: {} for side in args.order}
    try:
        clients = {c: {name: connect(EngineConfig(backend="server", endpoint=s.base_url, concurrency=c), s.served_name)
                       for name, s in servers.items()} for c in args.concurrency}
        for name in ("critique", "instruct", "filter"):
            stages(max(args.concurrency), local)[name]()  # warm-ups: first calls of each backend
            stages(1, clients[args.concurrency[0]])[name]()
            for side in args.order:
                backend, c = side.split(".c")
                fn = stages(int(c), local if backend == "inproc" else clients[int(c)])[name]
                t0 = time.perf_counter()
                fn()
                out[side][f"{name}.items_per_s"] = n / (time.perf_counter() - t0)
        for cl in (x for per in clients.values() for x in per.values()):
            cl.close()

        # ---- filter cost per pair: the questions the stage asks, in the order it sends them
        f = CheckConfig(max_new_tokens=24)
        sections = check_stage.load_filter_template(f)
        m = min(n, 8)
        todo = []
        for k in range(m):
            from richpref.common.images import decode_image, side_by_side

            oc, ec = decode_image(filter_images["original_cutout"][k]), decode_image(filter_images["edited_cutout"][k])
            todo.append(dict(iid=ids[k], prompt=prompts[k], instructions=instructions[k], original_cut=oc, edited_cut=ec,
                             pair=side_by_side(decode_image(filter_images["original"][k]), decode_image(filter_images["edited"][k])),
                             cuts=side_by_side(oc, ec)))
        # The attribute list a tiny model writes is gibberish: count with check.max_attributes (5) per item.
        listed = {t["iid"]: (["red colour", "round shape", "shiny surface", "metal handle", "white label"], "", None)
                  for t in todo}
        qs = check_stage.pair_questions(todo, sections, True, listed)
        # one attribute-list generation per item, about its original cut-out, asked before its questions
        order = []
        for k, t in enumerate(todo):
            order.append((t["original_cut"], check_stage.render(sections["attributes"], max_attributes=f.max_attributes)))
            order += [(q[2], q[3]) for q in qs if q[0] == k]
        total, cached, prefixes = prefix_counts(local["qwen"], order)
        from richpref.models import vlm_prefix

        qwen = local["qwen"]
        before = dict(vlm_prefix.STATS)
        check_stage.answers_sharing_image(qwen, qs, f.batch_size)
        enc = vlm_prefix.STATS["image_encodings"] - before["image_encodings"]
        gens, passes = m, len(order)
        out["filter_cost"] = {"passes_per_pair": passes / m, "prompt_tokens_per_pair": total / m,
                              "prompt_tokens_cached_per_pair": cached / m, "server_encodings_per_pair": prefixes / m,
                              "inproc_encodings_per_pair": (enc + gens) / m, "server_fewer_encodings": passes / prefixes,
                              "inproc_fewer_encodings": passes / (enc + gens), "fewer_prompt_tokens": total / cached}
        print(f"image encodings per pair: server {passes / prefixes:.1f}x fewer (CALCULATED), in-process "
              f"{passes / (enc + gens):.1f}x fewer; prompt tokens computed {total / cached:.1f}x fewer", flush=True)
        harness.print_child("RESULT ", out)
    finally:
        for s in servers.values():
            s.close()
        for v in local.values():
            v.close()
        tmp.cleanup()


if __name__ == "__main__":
    main()
