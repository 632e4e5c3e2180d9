"""Text embeddings of a Flow-DPO run, computed once per caption and kept with the run.

The text encoders of SD3 (CLIP-L, CLIP-G, T5-XXL), FLUX.1 (CLIP-L, T5-XXL) and Qwen-Image (Qwen2.5-VL)
weigh 5–16 GB; training needs only their outputs. Before the transformer loads, the pipeline is loaded
without its transformer and VAE, its own `encode_prompt` encodes every distinct caption (and the empty
one, for `proportion_empty_prompts`), and the results are written to `<output_dir>/text_embeds/<key>/`
with an index; the encoders are then released. A rerun with the same model and sequence length reuses
the files.

A caption's embeddings are large (FLUX.1: 512 T5 tokens × 4096 = 4 MiB in bf16; SD3 and FLUX.1 attend
to the padding, so it is kept), so the cache is written in files of about CHUNK_BYTES each (what building
holds in memory), in the dtype the encoders gave (their stored one: bf16 for FLUX.1's T5, so float32
copies would double it for nothing), and read lazily: each batch reads its captions' tensors from the
memory-mapped files, so training processes share the page cache instead of each loading the whole cache.

Captions longer than an encoder takes are truncated as the pipelines (and diffusers' training
scripts) truncate them: CLIP at 77 tokens, T5 / Qwen at `max_sequence_length`. They are counted and
logged, and the count is kept in the cache's meta.json.
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from richpref.common.atomic import link_or_copy
from richpref.models.generator import quiet_loading

from .flow_models import pipeline_class

log = logging.getLogger("richpref")

# diffusers' DreamBooth LoRA scripts' --max_sequence_length defaults
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 77, "flux": 512, "qwen_image": 512}


def default_max_len(model_dir: str, arch: str) -> int:
    """The scripts' default, capped at what the checkpoint's sampler takes: FLUX.1 [schnell] samples
    with 256 T5 tokens, and its joint attention sees the padding, so training on 512 would not match."""
    from richpref.models.families import MAX_SEQUENCE_LENGTH, detect_checkpoint_family

    return min(DEFAULT_MAX_SEQUENCE_LENGTH[arch], MAX_SEQUENCE_LENGTH[detect_checkpoint_family(model_dir)])
EMBEDS = "embeds-{:02d}-{:05d}.safetensors"  # process, chunk (one embeds.safetensors in older caches)
INDEX = "index.json"
META = "meta.json"
CHUNK_BYTES = 1 << 30


def _encode(pipe, arch: str, captions: list[str], device, max_len: int) -> list[dict]:
    with torch.no_grad():
        if arch == "sd3":
            pe, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=device,
                                                  do_classifier_free_guidance=False, max_sequence_length=max_len)
            return [{"prompt_embeds": pe[i], "pooled_prompt_embeds": pooled[i]} for i in range(len(captions))]
        if arch == "flux":
            pe, pooled, _ = pipe.encode_prompt(captions, None, device=device, max_sequence_length=max_len)
            return [{"prompt_embeds": pe[i], "pooled_prompt_embeds": pooled[i]} for i in range(len(captions))]
        pe, mask = pipe.encode_prompt(captions, device=device, max_sequence_length=max_len)
        lengths = mask.sum(1).tolist() if mask is not None else [pe.shape[1]] * len(captions)
        return [{"prompt_embeds": pe[i, : int(n)]} for i, n in enumerate(lengths)]


def _token_limits(pipe, arch: str, max_len: int) -> list[tuple[object, int]]:
    if arch == "qwen_image":
        return [(pipe.tokenizer, max_len)]
    toks = [(pipe.tokenizer, pipe.tokenizer.model_max_length)]
    if arch == "sd3":
        toks.append((pipe.tokenizer_2, pipe.tokenizer_2.model_max_length))
    toks.append((pipe.tokenizer_3 if arch == "sd3" else pipe.tokenizer_2, max_len))
    return toks


def count_truncated(pipe, arch: str, captions: list[str], max_len: int) -> int:
    """Captions with more tokens than one of the encoders takes (they are cut there)."""
    n = 0
    for c in captions:
        if any(len(tok(c, truncation=False).input_ids) > limit for tok, limit in _token_limits(pipe, arch, max_len)):
            n += 1
    return n


class TextEmbeddings:
    """Caption -> the tensors its transformer call needs, batched (Qwen-Image's padded, with a mask)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.index = json.loads((folder / INDEX).read_text())
        self.meta = json.loads((folder / META).read_text())
        self._where = {}  # tensor name -> the open (memory-mapped) file holding it
        for f in sorted(folder.glob("embeds*.safetensors")):
            handle = safe_open(str(f), framework="pt", device="cpu")
            self._where.update(dict.fromkeys(handle.keys(), handle))

    def tensor(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def batch(self, captions: list[str], device, dtype) -> dict:
        rows = [self.index[c] for c in captions]
        pe = [self.tensor(f"{r}.prompt_embeds") for r in rows]
        out = {}
        if f"{rows[0]}.pooled_prompt_embeds" in self._where:
            out["pooled_prompt_embeds"] = torch.stack([self.tensor(f"{r}.pooled_prompt_embeds") for r in rows])
            out["prompt_embeds"] = torch.stack(pe)
        else:
            longest = max(e.shape[0] for e in pe)
            out["prompt_embeds"] = torch.stack([torch.cat([e, e.new_zeros(longest - e.shape[0], e.shape[1])]) for e in pe])
            out["prompt_embeds_mask"] = torch.stack([torch.arange(longest) < e.shape[0] for e in pe]).long()
        return {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in out.items()}


def cache_key(model_dir: str, arch: str, max_len: int) -> str:
    return hashlib.sha256(json.dumps([os.path.abspath(model_dir), arch, max_len]).encode()).hexdigest()[:12]


def build_text_cache(model_dir: str, arch: str, captions: list[str], output_dir: str | os.PathLike, *,
                     max_sequence_length: int | None = None, batch_size: int = 8, device: torch.device | str = "cpu",
                     rank: int = 0, world: int = 1, barrier=lambda: None) -> TextEmbeddings:
    """Encode every distinct caption (and "") once; reuse the run's cache when it holds them all, and
    extend it with the ones it lacks (the next round's captions beside the earlier rounds' mixed in).

    Every process of a run calls it (`barrier`: the run's wait for every process): each encodes every
    world-th batch on its own device, so a run on 8 GPUs encodes 8 times as fast and none waits alone
    at a barrier that times out (NCCL's: 10 minutes by default) while another encodes a large set. The batches
    are the same whatever the process count, and so are the embeddings."""
    from safetensors.torch import save_file

    max_len = max_sequence_length or default_max_len(model_dir, arch)
    folder = Path(output_dir) / "text_embeds" / f"{arch}-{cache_key(model_dir, arch, max_len)}"
    known: dict[str, int] = {}  # the cache's captions, kept as they are
    earlier = {"truncated": 0, "files": 0}
    if (folder / META).exists():
        cached = TextEmbeddings(folder)
        if all(c in cached.index for c in set(captions) | {""}):
            log.info("text embeddings: %d captions from %s", len(cached.index), folder)
            return cached
        known, earlier = cached.index, {k: cached.meta.get(k, 0) for k in earlier}
        del cached
    wanted = sorted((set(captions) | {""}) - set(known))
    first = max(known.values(), default=-1) + 1  # the new captions' numbers follow the cache's
    tmp = folder.with_name(folder.name + ".tmp")
    barrier()  # every process has looked at the cache before it is rebuilt
    if rank == 0:
        if tmp.exists():  # a build cut short: its files are not this build's
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for f in folder.glob("embeds*.safetensors") if known else ():  # the cache's files, linked, not copied
            link_or_copy(f, tmp / f.name)
    barrier()
    quiet_loading()
    pipe = pipeline_class(arch).from_pretrained(model_dir, transformer=None, vae=None)
    pipe.to(device)
    mine = list(range(0, len(wanted), batch_size))[rank::world]
    truncated = count_truncated(pipe, arch, [c for b in mine for c in wanted[b: b + batch_size]], max_len)
    tensors: dict[str, torch.Tensor] = {}
    files = 0
    for k, start in enumerate(mine):
        for i, rec in enumerate(_encode(pipe, arch, wanted[start: start + batch_size], device, max_len)):
            for name, t in rec.items():
                tensors[f"{first + start + i}.{name}"] = t.detach().cpu().contiguous()
        if sum(t.nbytes for t in tensors.values()) >= CHUNK_BYTES or k == len(mine) - 1:
            # numbered after every file of the cache, so no name is taken
            save_file(tensors, str(tmp / EMBEDS.format(rank, earlier["files"] + files)))
            tensors, files = {}, files + 1
    del pipe
    gc.collect()
    (tmp / f"rank-{rank}.json").write_text(json.dumps({"truncated": truncated, "files": files}))
    barrier()
    if rank == 0:
        shares = [json.loads((tmp / f"rank-{r}.json").read_text()) for r in range(world)]
        for r in range(world):
            (tmp / f"rank-{r}.json").unlink()
        truncated, files = sum(x["truncated"] for x in shares), sum(x["files"] for x in shares)
        if truncated:
            log.warning("text embeddings: %d of %d captions are longer than the text encoders take (CLIP 77 tokens, "
                        "%d for the long encoder) and were truncated, as the pipelines do", truncated, len(wanted),
                        max_len)
        index = {**known, **{c: first + i for i, c in enumerate(wanted)}}
        (tmp / INDEX).write_text(json.dumps(index))
        (tmp / META).write_text(json.dumps({"model": model_dir, "arch": arch, "max_sequence_length": max_len,
                                            "captions": len(index), "truncated": earlier["truncated"] + truncated,
                                            "files": earlier["files"] + files, "processes": world}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        log.info("text embeddings: %d captions encoded into %s by %d process(es)%s", len(wanted), folder, world,
                 f", beside the {len(known)} it held" if known else "")
    barrier()
    return TextEmbeddings(folder)
