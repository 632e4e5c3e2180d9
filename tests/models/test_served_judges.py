"""The generative judges through an OpenAI-compatible server (`transformers serve` on the tiny
Qwen2.5-VL with EditScore's tiny LoRA merged in) against the in-process judges: the same answers,
so the same scores (NaN where the answer gives none, with the same raw text).

One server for the module, launched by the edit_score judge itself (engine.launch: the LoRA is
merged once and the merged model served); unified_reward and a second edit_score client use it as
an endpoint. The server is stopped by pid and checked gone.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from richpref.models.rewards import load_reward, load_reward_spec
from richpref.schemas.config import RewardSpec
from richpref.schemas.serving import EngineConfig
from test_served_vlm import gone
from vlm_helpers import PROMPTS, image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAUNCH = EngineConfig(backend="server", launch="transformers", startup_timeout_s=240, retries=1)
TOKENS = 12


@pytest.fixture(scope="module")
def launched(tiny_models, tmp_path_factory):
    import os

    os.environ["RICHPREF_CACHE"] = str(tmp_path_factory.getbasetemp() / "richpref-cache")
    base, lora = str(tiny_models / "qwen2.5-vl"), str(tiny_models / "editscore-lora")
    judge = load_reward("edit_score", base, adapter=lora, engine=LAUNCH, device="cpu", dtype="float32",
                        max_new_tokens=TOKENS)
    pid = judge.vlm.server.pid
    try:
        yield judge, base, lora
    finally:
        judge.close()
        assert gone(pid), "a launched judge server outlived its judge"


def endpoint(judge) -> EngineConfig:
    return EngineConfig(backend="server", endpoint=judge.vlm.base_url, served_model=judge.vlm.served_name, retries=1)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


def test_edit_score_served_equals_in_process(launched):
    served, base, lora = launched
    local = load_reward("edit_score", base, adapter=lora, device="cpu", dtype="float32", max_new_tokens=TOKENS)
    try:
        originals, edits = [image(k) for k in range(3)], [image(10 + k) for k in range(3)]
        instructions = ["Make the apple red", "Add a second dog", "Turn the car blue"]
        got = served.score_edits(originals, edits, instructions)
        want = local.score_edits(originals, edits, instructions, batch_size=3)
        assert same(got, want), (got, want)
        assert served.unparsed == local.unparsed and str(served.details) == str(local.details)
        assert len(local.unparsed) + int(np.isfinite(want).sum()) == 3
    finally:
        local.close()


def test_unified_reward_served_equals_in_process(launched):
    served_judge, _, _ = launched
    merged = served_judge.vlm.model_id  # the merged model the server serves
    spec = RewardSpec(kind="unified_reward", model=merged, max_new_tokens=TOKENS, engine=endpoint(served_judge))
    served = load_reward_spec(spec, device="cpu")
    local = load_reward("unified_reward", merged, device="cpu", dtype="float32", max_new_tokens=TOKENS)
    try:
        imgs = [image(k) for k in range(3)]
        got, want = served.score(imgs, PROMPTS), local.score(imgs, PROMPTS, batch_size=2)
        assert same(got, want) and served.unparsed == local.unparsed, (served.unparsed, local.unparsed)
    finally:
        served.close()
        local.close()
    assert served_judge.vlm.server.alive()  # a client of an endpoint never stops the server


def test_an_endpoint_judge_reports_a_failed_request_as_its_raw_reason(launched):
    served_judge, base, lora = launched
    engine = EngineConfig(backend="server", endpoint=served_judge.vlm.base_url, served_model="no-such-model", retries=0)
    judge = load_reward("edit_score", base, adapter=lora, engine=engine, device="cpu", max_new_tokens=TOKENS)
    try:
        s = judge.score_edits([image(1)], [image(2)], ["Add a hat"])
        assert math.isnan(s[0]) and "vlm_request_failed" in judge.unparsed[0]
    finally:
        judge.close()
