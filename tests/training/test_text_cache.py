"""The caption embeddings of a Flow-DPO run (richpref/training/text_cache.py): truncation, the default
length, and a cache that neither building nor training holds whole in memory."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from richpref.training import text_cache
from richpref.training.text_cache import TextEmbeddings, build_text_cache
from process_helpers import run_spawned

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["a cat", "a dog", "a red car", "two birds", "a house"]


def test_long_captions_are_truncated_and_counted(tiny_models, tmp_path):
    from richpref.training.text_cache import build_text_cache

    long = "a dog running on a beach near the water " * 20
    cache = build_text_cache(str(tiny_models / "flux"), "flux", ["a cat", long], tmp_path, max_sequence_length=16)
    assert cache.meta["truncated"] == 1 and cache.meta["captions"] == 3  # with "" for empty prompts
    batch = cache.batch([long, "a cat"], "cpu", torch.float32)
    assert batch["prompt_embeds"].shape[:2] == (2, 16) and batch["pooled_prompt_embeds"].shape[0] == 2
    again = build_text_cache(str(tiny_models / "flux"), "flux", ["a cat"], tmp_path, max_sequence_length=16)
    assert again.meta == cache.meta  # reused, not encoded again
    # SD3 cuts at its CLIPs' 77 tokens and T5's limit, Qwen-Image at its one encoder's
    middle = "a dog running on a beach near the water " * 3  # 47 CLIP tokens, 79 of the tiny T5's
    sd3 = build_text_cache(str(tiny_models / "sd3"), "sd3", ["a cat", middle, long], tmp_path, max_sequence_length=16)
    assert sd3.meta["truncated"] == 2
    assert build_text_cache(str(tiny_models / "sd3"), "sd3", ["a cat", middle, long], tmp_path / "t5",
                            max_sequence_length=128).meta["truncated"] == 1
    qwen = build_text_cache(str(tiny_models / "qwen-image"), "qwen_image", ["a cat", middle, long], tmp_path,
                            max_sequence_length=16)
    assert qwen.meta["truncated"] == 2
    # Qwen-Image's embeddings keep their own length: a batch pads them and masks exactly the padding
    batch = qwen.batch(["a cat", long], "cpu", torch.float32)
    lengths = [qwen.tensor(f"{qwen.index[c]}.prompt_embeds").shape[0] for c in ("a cat", long)]
    assert lengths[0] < lengths[1] == batch["prompt_embeds"].shape[1] <= 16
    assert batch["prompt_embeds_mask"].sum(1).tolist() == lengths
    # a caption of exactly the limit (T5's 4 tokens of "a cat", its end token included) is not cut
    for limit, cut in ((4, 0), (3, 1)):
        assert build_text_cache(str(tiny_models / "flux"), "flux", ["a cat"], tmp_path / f"at{limit}",
                                max_sequence_length=limit).meta["truncated"] == cut


def test_the_default_prompt_length_is_the_scripts_capped_at_what_the_checkpoints_sampler_takes(tiny_models, tmp_path):
    import shutil

    from richpref.training.text_cache import default_max_len

    assert [default_max_len(str(tiny_models / m), a) for m, a in (("flux", "flux"), ("sd3", "sd3"), ("qwen-image", "qwen_image"))] \
        == [512, 77, 512]
    # FLUX.1 [schnell] (no guidance embedding) samples with 256 T5 tokens: before, it trained on 512
    schnell = tmp_path / "schnell"
    shutil.copytree(tiny_models / "flux", schnell, ignore=lambda d, names: [n for n in names if n.endswith(".safetensors")])
    config = schnell / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": False}))
    assert default_max_len(str(schnell), "flux") == 256


def test_the_cache_is_written_in_chunks_and_read_the_same(tiny_models, tmp_path, monkeypatch):
    model = str(tiny_models / "sd3")
    whole = build_text_cache(model, "sd3", CAPTIONS, tmp_path / "whole", max_sequence_length=16, batch_size=2)
    assert whole.meta["files"] == 1
    monkeypatch.setattr(text_cache, "CHUNK_BYTES", 1)  # every encoded batch closes a file
    folder = tmp_path / "chunked" / "text_embeds" / f"sd3-{text_cache.cache_key(model, 'sd3', 16)}"
    stale = folder.with_name(folder.name + ".tmp")  # left by a build cut short: none of it is kept
    stale.mkdir(parents=True)
    save_file({"0.prompt_embeds": torch.zeros(1)}, str(stale / text_cache.EMBEDS.format(0, 9)))
    chunked = build_text_cache(model, "sd3", CAPTIONS, tmp_path / "chunked", max_sequence_length=16, batch_size=2)
    # 6 captions ("" too) in batches of 2: three files, so building held one batch at a time, not the whole cache
    assert sorted(f.name for f in folder.glob("embeds*")) == [f"embeds-00-0000{i}.safetensors" for i in range(3)]
    assert chunked.meta["files"] == 3 and not stale.exists()
    for captions in (CAPTIONS[:2], ["", CAPTIONS[4], CAPTIONS[0]]):
        a, b = whole.batch(captions, "cpu", torch.float32), chunked.batch(captions, "cpu", torch.float32)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cache_is_extended_with_the_captions_it_lacks(tiny_models, tmp_path, monkeypatch):
    # the next round's captions beside the earlier rounds' (mix_previous): before, all were encoded again
    model = str(tiny_models / "flux")
    first = build_text_cache(model, "flux", CAPTIONS[:3], tmp_path, max_sequence_length=16, batch_size=2)
    kept = {c: first.batch([c], "cpu", torch.float32) for c in ["", *CAPTIONS[:3]]}
    encoded, encode = [], text_cache._encode
    monkeypatch.setattr(text_cache, "_encode", lambda pipe, arch, caps, *a: encoded.extend(caps) or encode(pipe, arch, caps, *a))
    grown = build_text_cache(model, "flux", [*CAPTIONS[1:], LONG], tmp_path, max_sequence_length=16, batch_size=2)
    assert sorted(encoded) == sorted([*CAPTIONS[3:], LONG])  # only what it lacked
    assert (grown.meta["captions"], grown.meta["truncated"], grown.meta["files"]) == (7, 1, first.meta["files"] + 1)
    fresh = build_text_cache(model, "flux", [*CAPTIONS, LONG], tmp_path / "fresh", max_sequence_length=16, batch_size=2)
    for c in ["", *CAPTIONS, LONG]:
        a, b = grown.batch([c], "cpu", torch.float32), fresh.batch([c], "cpu", torch.float32)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), c
        if c in kept:  # the cache's own tensors, as they were
            assert all(torch.equal(a[k], kept[c][k]) for k in a), c
    assert build_text_cache(model, "flux", CAPTIONS, tmp_path, max_sequence_length=16).meta == grown.meta  # reused


def test_the_cache_keeps_the_encoders_dtype(tiny_models, tmp_path):
    # FLUX.1's T5 is stored in bf16: float32 copies of its outputs doubled a cache of 4 MiB a caption
    import shutil

    from transformers import T5EncoderModel

    model = tmp_path / "flux-bf16"
    shutil.copytree(tiny_models / "flux", model)
    T5EncoderModel.from_pretrained(model / "text_encoder_2", dtype=torch.bfloat16).save_pretrained(model / "text_encoder_2")
    cache = build_text_cache(str(model), "flux", CAPTIONS, tmp_path / "out", max_sequence_length=16)
    [file] = (tmp_path / "out" / "text_embeds").glob("flux-*/embeds*.safetensors")
    with safe_open(str(file), framework="pt") as f:
        assert f.get_slice("0.prompt_embeds").get_dtype() == "BF16"
    assert cache.batch(CAPTIONS[:2], "cpu", torch.float32)["prompt_embeds"].dtype == torch.float32


def test_opening_a_cache_reads_no_tensors(tmp_path):
    # memory-mapped: opening the cache reads no tensor data, and the training processes share the page cache
    folder = tmp_path / "cache"
    folder.mkdir()
    n, shape = 64, (512, 1024)  # 2 MiB each in float32: 128 MiB
    # the one file of a cache written before the chunks: still read
    save_file({f"{i}.prompt_embeds": torch.full(shape, float(i)) for i in range(n)}, str(folder / "embeds.safetensors"))
    (folder / text_cache.INDEX).write_text(json.dumps({f"caption {i}": i for i in range(n)}))
    (folder / text_cache.META).write_text(json.dumps({"captions": n}))

    def resident_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    before = resident_mib()
    cache = TextEmbeddings(folder)
    assert resident_mib() - before < 32
    batch = cache.batch(["caption 3", "caption 60"], "cpu", torch.float32)["prompt_embeds"]
    assert batch.shape == (2, *shape) and batch[0, 0, 0] == 3 and batch[1, -1, -1] == 60


LONG = "a dog running on a beach near the water " * 20


def _encode_share(rank: int, world: int, model: str, out: str, store: str, more: tuple = ()) -> None:
    """One process of a 2-process run (spawned, gloo on CPU), as train.py calls the cache."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        build_text_cache(model, "sd3", [*CAPTIONS, LONG, *more], out, max_sequence_length=16, batch_size=2, rank=rank,
                         world=world, barrier=dist.barrier)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_the_processes_of_a_run_share_the_encoding(tiny_models, tmp_path):
    # before, the main process encoded every caption while the others waited at a barrier that times out
    model = str(tiny_models / "sd3")
    one = build_text_cache(model, "sd3", [*CAPTIONS, LONG], tmp_path / "one", max_sequence_length=16, batch_size=2)
    shares = [(rank, 2, model, str(tmp_path / "two"), str(tmp_path / "store")) for rank in range(2)]
    assert run_spawned(_encode_share, shares) == [0, 0]
    [folder] = (tmp_path / "two" / "text_embeds").glob("sd3-*")
    # 7 captions ("" too) in 4 batches of 2: process 0 encoded batches 0 and 2, process 1 batches 1 and 3
    # (LONG, the one cut, is in batch 1: the count is the sum of both processes')
    keys = {}
    for f in sorted(folder.glob("embeds*")):
        with safe_open(str(f), framework="pt") as h:
            keys[f.name] = sorted({int(k.split(".")[0]) for k in h.keys()})
    assert keys == {"embeds-00-00000.safetensors": [0, 1, 4, 5], "embeds-01-00000.safetensors": [2, 3, 6]}
    two = TextEmbeddings(folder)
    assert two.index == one.index and two.meta["truncated"] == one.meta["truncated"] == 1
    assert two.meta["processes"] == 2 and not folder.with_name(folder.name + ".tmp").exists()
    assert sorted(f.name for f in folder.iterdir()) == [*keys, "index.json", "meta.json"]
    for c in one.index:  # the same batches, so the same embeddings
        a, b = one.batch([c], "cpu", torch.float32), two.batch([c], "cpu", torch.float32)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # extended by both processes: the one new caption's batch is process 0's, in a file after the cache's
    more = [(*share[:4], str(tmp_path / "store2"), ("a green kite",)) for share in shares]
    assert run_spawned(_encode_share, more) == [0, 0]
    grown = TextEmbeddings(folder)
    assert grown.index == {**one.index, "a green kite": 7} and grown.meta["files"] == 3
    assert sorted(f.name for f in folder.glob("embeds*")) == sorted([*keys, "embeds-00-00002.safetensors"])
    assert all(torch.equal(grown.tensor(f"{i}.prompt_embeds"), two.tensor(f"{i}.prompt_embeds")) for i in range(7))


def test_runs_sharing_a_text_cache_dir_encode_their_captions_once(tiny_models, tmp_path, monkeypatch):
    # rounds give every round's finetune the rounds folder: before, each round encoded the same prompts again
    from test_flow_step import flow_config, write_brightness_pairs
    from richpref.training.train import train

    pairs = write_brightness_pairs(tmp_path / "pairs.parquet", 8)
    loads = []
    pipeline_class = text_cache.pipeline_class
    monkeypatch.setattr(text_cache, "pipeline_class", lambda arch: loads.append(arch) or pipeline_class(arch))
    for k in (1, 2):
        cfg = flow_config(tiny_models, pairs, "sd3", max_train_steps=1, text_cache_dir=str(tmp_path / "rounds"))
        train(cfg, tmp_path / f"round-{k}")
        assert not (tmp_path / f"round-{k}" / "text_embeds").exists()
    assert loads == ["sd3"] and list((tmp_path / "rounds" / "text_embeds").glob("sd3-*/index.json"))
