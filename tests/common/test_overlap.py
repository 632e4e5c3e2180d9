"""The thread pool around model batches: same results in the same order as running inline, errors
surface, cut-out masks batched per model call equal one-at-a-time masks, providers are explained."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from richpref.common.overlap import Memo, chunks, measure, pipelined

# One torch thread, so the cut-out session below gets one onnxruntime thread too (models/cutout.py
# session_options): with one per core it took 54-76 s instead of ~1 s beside the other pytest worker.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pipelined_keeps_order_and_overlaps_cpu_work():
    model_threads, cpu_threads = set(), set()

    def prepare(batch):
        cpu_threads.add(threading.current_thread().name)
        return [x + 1 for x in batch]

    def run(prepared):
        model_threads.add(threading.current_thread().name)
        time.sleep(0.05)
        return [x * 10 for x in prepared]

    def finish(batch, prepared, result):
        cpu_threads.add(threading.current_thread().name)
        time.sleep(0.05)
        return [r + x for r, x in zip(result, batch)]

    batches = chunks(list(range(10)), 3)
    with measure() as stats:
        out = pipelined(batches, run, prepare=prepare, finish=finish, threads=2)
    assert out == [[(x + 1) * 10 + x for x in b] for b in batches]
    assert model_threads == {threading.main_thread().name} and threading.main_thread().name not in cpu_threads
    assert stats.batches == 4 and stats.model_s == pytest.approx(0.2, abs=0.1) and stats.cpu_s >= 0.2
    assert stats.wall_s < stats.model_s + stats.cpu_s  # the finishing ran beside the model
    assert pipelined(batches, run, prepare=prepare, finish=finish, threads=0) == out


def test_an_error_in_cpu_work_is_raised():
    def finish(batch, prepared, result):
        if batch[0] == 3:
            raise ValueError("cannot encode batch 3")
        return result

    with pytest.raises(ValueError, match="batch 3"):
        pipelined(chunks(list(range(6)), 3), lambda b: b, finish=finish, threads=2)


def test_memo_hands_out_prefetched_values_and_computes_misses():
    calls = []

    def detector(im):
        calls.append(im.size)
        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    memo = Memo(detector)
    a, b = Image.new("RGB", (8, 8), (1, 2, 3)), Image.new("RGB", (9, 8), (4, 5, 6))
    memo.fill([a, a.copy()])
    assert calls == [(8, 8)]  # equal images are computed once
    assert memo(a.copy()).tobytes() == detector(a).tobytes() and len(calls) == 2
    memo(b)  # never prefetched: computed on the spot
    memo.drop([a])
    memo(a)
    assert len(calls) == 4


def _scenes(n):
    out = []
    for i in range(n):
        im = Image.new("RGB", (48 + 8 * i, 40), (20 + 30 * i, 60, 90))
        ImageDraw.Draw(im).ellipse((10, 8, 30 + 4 * i, 30), fill=(250, 200 - 20 * i, 40))
        out.append(im)
    return out + [Image.new("RGB", (32, 32), (7, 7, 7))]  # a flat image: an empty mask, no model call


def test_batched_cutout_masks_equal_one_at_a_time(tiny_models, monkeypatch):
    from richpref.models.cutout import BackgroundRemover

    home = tiny_models / "rembg"
    monkeypatch.setenv("U2NET_HOME", str(home))
    remover = BackgroundRemover.load("u2net_custom", model_path=str(home / "tiny-u2net.onnx"), home=str(home),
                                     device="cpu")
    assert remover.providers == ["CPUExecutionProvider"] and remover.batchable()
    images = _scenes(5)
    one = remover.masks(images, batch_size=1)
    batched = remover.masks(images, batch_size=4)
    assert [m.size for m in batched] == [im.size for im in images]
    for a, b in zip(one, batched):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.asarray(batched[-1]).any()


def test_cuda_providers_explain_the_gpu_extra():
    from richpref.models.cutout import onnx_providers

    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    assert onnx_providers("cpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():  # onnxruntime-gpu: CUDA first, CPU behind
        assert onnx_providers("auto") == onnx_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return
    assert onnx_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=r"richpref\[gpu\]"):
        onnx_providers("cuda")
    with pytest.raises(ValueError, match="onnxruntime-gpu"):
        onnx_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])
