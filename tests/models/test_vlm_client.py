"""critique, instruct and filter through an OpenAI-compatible server that richpref launches
(`transformers serve` on the tiny Qwen2.5-VL and LLaVA-OneVision), against the in-process backend.

One server per model for the module; every server a test starts is stopped by pid and checked gone.
Faults (garbage bodies, HTTP 500, a server busy with HTTP 503, a server that is down) come from a
small proxy in front of the real server (tests/vlm_helpers.py); a dead server is a real SIGKILL.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time

import httpx
import numpy as np
import pyarrow as pa
import pytest
from tenacity import RetryCallState

from richpref.common.images import encode_png
from richpref.models.vlm import VisionLanguageModel
from richpref.models.vlm_client import ServedVLM, ServerBusy, ServerUnavailable, _retryable, _wait, connect
from richpref.prompts import load_template
from richpref.schemas.config import CheckConfig, CritiqueConfig, FilterConfig, InstructConfig
from richpref.schemas.serving import EngineConfig
from richpref.tasks import critique as critique_stage
from richpref.tasks import filter as filter_stage
from richpref.tasks import check as check_stage
from richpref.tasks import instruct as instruct_stage
from process_helpers import gone
from vlm_helpers import PROMPTS, FaultProxy, argmax_answer, filter_input, image, instruct_input, same_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAUNCH = EngineConfig(backend="server", launch="transformers", startup_timeout_s=240, retries=1)


@pytest.fixture(scope="module")
def served(tiny_models):
    """{"critic": (served, in-process), "qwen": (served, in-process)}: one server per model."""
    out = {}
    try:
        for name, folder in (("critic", "llava-critic"), ("qwen", "qwen2.5-vl")):
            path = str(tiny_models / folder)
            out[name] = (connect(LAUNCH, path, device="cpu"), VisionLanguageModel.load(path, device="cpu"))
        yield out
    finally:
        pids = [s.server.pid for s, _ in out.values()]
        log_dirs = [s.server.log_dir for s, _ in out.values()]
        for s, local in out.values():
            s.close()
            local.close()
        assert all(gone(p) for p in pids), "a launched server outlived its client"
        assert not [d for d in log_dirs if d.exists()], "a stopped server's temporary log folder was left behind"


def test_launched_server_is_healthy_and_owned(served):
    from richpref.common.procs import registry_dir

    for s, _ in served.values():
        assert s.server.alive() and httpx.get(s.base_url.rsplit("/v1", 1)[0] + "/health").status_code == 200
        assert (registry_dir() / f"{s.server.pid}.json").exists()
        assert s.base_url.startswith("http://127.0.0.1:")


def test_critique_through_the_server_equals_in_process(served):
    remote, local = served["critic"]
    cfg = CritiqueConfig(max_new_tokens=8, batch_size=2, reject_no_issues=False)
    rows = pa.table({"item_id": ["a", "b", "c", "bad"], "prompt": PROMPTS + ["x"]})
    images = [encode_png(image(k)) for k in range(3)] + [b"not an image"]
    got = critique_stage.critique_rows(rows, images, cfg, lambda: remote).to_pylist()
    want = critique_stage.critique_rows(rows, images, cfg, lambda: local).to_pylist()
    assert [r["raw"] for r in got] == [r["raw"] for r in want]
    assert [(r["status"], (r["reason"] or "").split(":")[0]) for r in got] == \
        [(r["status"], (r["reason"] or "").split(":")[0]) for r in want]
    assert got[3]["reason"].startswith("bad_image:")


def test_instruct_through_the_server_matches_in_process(served):
    remote, local = served["qwen"]
    rows, images = instruct_input()
    cfg = InstructConfig(max_new_tokens=10, batch_size=3, min_grounding=0, drop_truncated=False, min_visible=0.3)
    got = instruct_stage.instruct_rows(rows, images, cfg, lambda: remote).to_pylist()
    want = instruct_stage.instruct_rows(rows, images, cfg, lambda: local).to_pylist()
    template = load_template("instruct_v1")
    for k, (g, w) in enumerate(zip(got, want)):
        prompt = instruct_stage.instruct_prompt(template, PROMPTS[k], rows.column("critique")[k].as_py(), cfg)
        assert same_text(g["raw"], w["raw"], local, image(10 + k), prompt, 10), (g["raw"], w["raw"])
        assert g["truncated"] == w["truncated"]
        assert g["visible_source"] in (None, "answer") and w["visible_source"] in (None, "logits")
    # transformers serve ignores logprobs: visibility answers are one token, P exactly 0 or 1
    for g in got:
        for reason in g["drop_reasons"] or []:
            assert reason.startswith("not_visible: P(yes)=0.000")


def test_yes_no_answers_are_the_biased_argmax(served):
    remote, local = served["qwen"]
    imgs = [image(k) for k in range(4)]
    prompts = [f"Does the image show {w}? Answer yes or no." for w in ("a dog", "a car", "an apple", "a lake")]
    answers = remote.yes_no(imgs, prompts)
    assert all(a.source == "answer" and a.error is None for a in answers)
    assert [a.p for a in answers] == argmax_answer(local, imgs, prompts)


def test_filter_through_the_server(served):
    remote, local = served["qwen"]
    rows, prompts, instructions, images = filter_input()
    check = CheckConfig(max_new_tokens=8, batch_size=4)
    cfg = FilterConfig(min_executed=0.5, min_no_stray=0.5, min_subject_kept=0.5, min_attribute_present=0.5,
                       min_attributes_kept=0.01)
    remote.stats.update(requests=0, prompt_tokens=0)
    got = filter_stage.filter_rows(rows, prompts, instructions, images, check, cfg, lambda: remote).to_pylist()
    want = filter_stage.filter_rows(rows, prompts, instructions, images, check, cfg, lambda: local).to_pylist()
    assert [r["item_id"] for r in got] == ["f0", "f1", "f2"]
    for g, w in zip(got, want):
        assert g["p_source"] == "answer" and w["p_source"] == "logits"
        assert all(p in (0.0, 1.0) for p in [g["p_no_stray"], g["p_subject_kept"], *g["p_executed_each"]])
        assert g["attributes_raw"] == w["attributes_raw"] or g["status"] == "rejected"
        assert (g["status"] == "ok") == all(v == "pass" or v.startswith("skipped")
                                            for v in json.loads(g["checks"]).values())
    # every question is one request: 3 pairs x (instructions + no_stray + subject) + attributes
    assert remote.stats["requests"] >= 3 * 3


def test_garbage_or_http_error_rejects_only_that_row(served):
    remote, local = served["critic"]
    proxy = FaultProxy(remote.base_url)
    client = connect(EngineConfig(backend="server", endpoint=proxy.url, retries=1), remote.served_name)
    try:
        cfg = CritiqueConfig(max_new_tokens=8, reject_no_issues=False)
        prompts = [PROMPTS[0], "GARBAGE please", PROMPTS[1], "FAIL500 please"]
        rows = pa.table({"item_id": list("abcd"), "prompt": prompts})
        images = [encode_png(image(k)) for k in range(4)]
        out = critique_stage.critique_rows(rows, images, cfg, lambda: client).to_pylist()
        want = critique_stage.critique_rows(rows, images, cfg, lambda: local).to_pylist()
    finally:
        client.close()
        proxy.stop()
    assert out[1]["status"] == out[3]["status"] == "rejected"
    assert out[1]["reason"].startswith("vlm_bad_response: not JSON")
    assert out[3]["reason"].startswith("vlm_request_failed: HTTP 500 after 2 attempt(s)")
    assert [(out[k]["raw"], out[k]["status"]) for k in (0, 2)] == [(want[k]["raw"], want[k]["status"]) for k in (0, 2)]


def test_a_server_busy_through_every_retry_fails_the_shard_and_a_rerun_completes(served):
    """HTTP 503 (or 429, 502, 504) says the server is loaded, not that the row is bad: a row rejected
    for it would stay rejected in the committed shard."""
    remote, local = served["critic"]
    proxy = FaultProxy(remote.base_url, busy_for=2)  # both attempts of the first request
    client = connect(EngineConfig(backend="server", endpoint=proxy.url, retries=1, concurrency=1), remote.served_name)
    cfg = CritiqueConfig(max_new_tokens=8, reject_no_issues=False)
    rows = pa.table({"item_id": ["a", "b"], "prompt": PROMPTS[:2]})
    images = [encode_png(image(k)) for k in range(2)]
    try:
        with pytest.raises(ServerBusy, match=r"answered HTTP 503 after 2 attempt\(s\)"):
            critique_stage.critique_rows(rows, images, cfg, lambda: client)
        rerun = critique_stage.critique_rows(rows, images, cfg, lambda: client).to_pylist()  # no longer busy
    finally:
        client.close()
        proxy.stop()
    want = critique_stage.critique_rows(rows, images, cfg, lambda: local).to_pylist()
    assert [(r["raw"], r["status"]) for r in rerun] == [(r["raw"], r["status"]) for r in want]


def test_a_busy_servers_retry_after_is_waited_for(served):
    remote, _ = served["critic"]
    proxy = FaultProxy(remote.base_url, busy_for=1, retry_after="1.5")
    client = connect(EngineConfig(backend="server", endpoint=proxy.url, retries=1), remote.served_name)
    try:
        start = time.monotonic()
        [answer] = client.generate_detailed([image(0)], [PROMPTS[0]], max_new_tokens=4)
        waited = time.monotonic() - start
    finally:
        client.close()
        proxy.stop()
    assert answer.error is None and waited >= 1.5  # the backoff alone: 0.25 s
    # asked greedily, twice (the refused try, then the answered one); counted once, with its usage's tokens
    assert [(b["temperature"], b["max_tokens"]) for b in proxy.bodies] == [(0.0, 4)] * 2
    assert client.stats["requests"] == 1 and client.stats["prompt_tokens"] > 0 and client.stats["completion_tokens"] > 0

    def wait_for(retry_after):  # before retrying a 503 that said `Retry-After: retry_after`
        state, response = RetryCallState(None, None, (), {}), httpx.Response(503, headers={"Retry-After": retry_after})
        error = httpx.HTTPStatusError("busy", request=httpx.Request("POST", "http://x"), response=response)
        state.set_exception((type(error), error, None))
        return _wait(state)
    # capped at a minute; as asked; an HTTP date or nothing readable: the backoff
    assert [wait_for(a) for a in ("3600", "2", "Wed, 21 Oct 2026 07:28:00 GMT", "")] == [60.0, 2.0, 0.25, 0.25]


def test_a_loaded_or_failing_server_and_a_lost_connection_are_retried_a_refused_request_is_not():
    def answered(code):
        return httpx.HTTPStatusError("x", request=httpx.Request("POST", "http://x"), response=httpx.Response(code))

    assert [_retryable(answered(c)) for c in (500, 502, 503, 504, 429)] == [True] * 5
    assert [_retryable(answered(c)) for c in (400, 404, 413, 422, 499)] == [False] * 5  # the same again would fail
    assert _retryable(httpx.ConnectError("refused")) and _retryable(httpx.ReadTimeout("slow"))
    assert not _retryable(ValueError("not JSON"))


def test_a_request_that_times_out_on_a_live_launched_server_rejects_its_row_and_leaves_the_server(served):
    remote, _ = served["critic"]  # its launched server, alive: the request, not the server, failed
    hasty = ServedVLM(LAUNCH.model_copy(update={"retries": 0, "request_timeout_s": 0.001, "restarts": 1}),
                      remote.served_name, remote.model_id, server=remote.server)
    [answer] = hasty.generate_detailed([image(0)], [PROMPTS[0]], max_new_tokens=4)
    hasty.http.close()  # not close(): that stops the module's server
    assert answer.error.startswith("vlm_request_failed: ") and "Timeout after 1 attempt(s)" in answer.error, answer
    assert remote.server.starts == 1 and hasty.restarts_left == 1


def test_yes_no_is_read_from_the_answer_tokens_top_logprobs_where_a_server_returns_them(monkeypatch):
    # vLLM's and SGLang's reply shape (transformers serve returns no logprobs: its answers read "answer")
    def reply(top, content):
        logprobs = {"content": [{"token": content, "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in top]}]}
        return {"choices": [{"message": {"content": content}, "logprobs": logprobs if top else None}]}

    replies = iter([reply([("Yes", 0.5), (" yes", 0.1), (" no", 0.2), ("maybe", 0.2)], "Yes"),
                    reply([("maybe", 0.9)], "No."), reply([], "perhaps")])
    client = ServedVLM(EngineConfig(backend="server", endpoint="http://127.0.0.1:9/v1", concurrency=1), "m", "m")
    asked = []
    monkeypatch.setattr(client, "_post", lambda body: asked.append(body) or next(replies))
    got = client.yes_no([image(0)] * 3, ["q"] * 3)
    client.close()
    assert {(b["max_tokens"], b["logprobs"], b["top_logprobs"]) for b in asked} == {(1, True, client.engine.top_logprobs)}
    assert (got[0].p, got[0].source) == (pytest.approx(0.75), "logprobs")  # (0.5 + 0.1) / (0.5 + 0.1 + 0.2)
    assert (got[1].p, got[1].source, got[1].error) == (0.0, "answer", None)  # no option among them: the answer
    assert got[2].p is None and got[2].error.startswith("unparseable_answer: 'perhaps' is none of ['Yes', 'No']")


def test_an_unreachable_endpoint_fails_the_shard_and_a_rerun_completes(served):
    remote, local = served["critic"]
    proxy = FaultProxy(remote.base_url)
    url = proxy.url
    proxy.stop()  # the server is down
    cfg = CritiqueConfig(max_new_tokens=8, reject_no_issues=False)
    rows = pa.table({"item_id": ["a", "b"], "prompt": PROMPTS[:2]})
    images = [encode_png(image(k)) for k in range(2)]
    client = connect(EngineConfig(backend="server", endpoint=url, retries=1), remote.served_name)
    with pytest.raises(ServerUnavailable, match="cannot reach the VLM server"):
        critique_stage.critique_rows(rows, images, cfg, lambda: client)
    client.close()
    rerun = critique_stage.critique_rows(rows, images, cfg, lambda: remote).to_pylist()
    want = critique_stage.critique_rows(rows, images, cfg, lambda: local).to_pylist()
    assert [r["raw"] for r in rerun] == [r["raw"] for r in want]


def _kill_after(client, n_requests: int) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + 120
        while client.stats["requests"] < n_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(client.server.pid, signal.SIGKILL)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_a_server_killed_mid_shard_is_restarted_or_fails_cleanly(served, tiny_models):
    _, local = served["critic"]
    path = str(tiny_models / "llava-critic")
    cfg = CritiqueConfig(max_new_tokens=8, reject_no_issues=False)
    rows = pa.table({"item_id": list("abcdef"), "prompt": (PROMPTS * 2)})
    images = [encode_png(image(k)) for k in range(6)]
    want = [(r["raw"], r["status"]) for r in critique_stage.critique_rows(rows, images, cfg, lambda: local).to_pylist()]
    # restarts: 1 -> the server is started again and the shard completes with the same outputs; then,
    # no restart left (as with restarts: 0), the next death fails the shard with the reason and nothing
    # is returned for it. One launched server serves both cases.
    client = connect(LAUNCH.model_copy(update={"concurrency": 1, "restarts": 1}), path, device="cpu")
    pids = [client.server.pid]
    try:
        watcher = _kill_after(client, 2)
        out = critique_stage.critique_rows(rows, images, cfg, lambda: client).to_pylist()
        watcher.join()
        pids.append(client.server.pid)
        assert client.server.starts == 2 and client.restarts_left == 0
        assert [(r["raw"], r["status"]) for r in out] == want

        watcher = _kill_after(client, client.stats["requests"] + 2)
        with pytest.raises(ServerUnavailable, match="died"):
            critique_stage.critique_rows(rows, images, cfg, lambda: client)
        watcher.join()
        assert client.server.starts == 2  # not started a third time
    finally:
        client.close()
    assert all(gone(p) for p in pids)


def test_a_server_that_cannot_start_fails_in_bounded_time_with_its_log(tmp_path):
    from richpref.models.vlm_server import LaunchedServer, ServerStartError

    engine = EngineConfig(backend="server", launch="transformers", startup_timeout_s=60)
    started = time.monotonic()
    server = LaunchedServer(engine, str(tmp_path / "no-such-model"), "x", device="cpu")
    with pytest.raises(ServerStartError, match="exited with code") as err:
        server.start()
    assert time.monotonic() - started < 60 and "log" in str(err.value) and "fix:" in str(err.value)
    assert server.proc is None
    # the log the error names stays (its temporary folder too), also once the server is stopped again
    log = server.log_path
    server.stop()
    assert str(log) in str(err.value) and log.exists()
    shutil.rmtree(log.parent)


def test_vlm_score_reward_through_the_server(served):
    from richpref.models.rewards import load_reward_spec
    from richpref.schemas.config import RewardSpec

    remote, local = served["qwen"]
    spec = RewardSpec(kind="vlm_score", model=local.model_id,
                      engine=EngineConfig(backend="server", endpoint=remote.base_url, served_model=remote.served_name))
    reward = load_reward_spec(spec)
    try:
        imgs, prompts = [image(k) for k in range(3)], PROMPTS
        got = reward.score(imgs, prompts)
        # no logprobs from transformers serve: the answered digit (forced to a digit by the logit bias)
        digits = local.option_probabilities(imgs, reward.questions(prompts), [str(m) for m in range(1, 10)])
        np.testing.assert_allclose(got, digits.argmax(axis=1) / 8.0)
    finally:
        reward.close()
    assert remote.server.alive()  # a client of an endpoint never stops the server


def test_in_process_filter_batches_hold_whole_pairs():
    qs = [(0, "a"), (0, "b"), (0, "c"), (1, "a"), (1, "b"), (2, "a"), (2, "b"), (2, "c"), (2, "d"), (2, "e")]
    sizes = [[len(b), {q[0] for q in b}] for b in check_stage.pair_batches(qs, 5, served=False)]
    assert sizes == [[5, {0, 1}], [5, {2}]]  # pair 2 alone fills a batch; no pair is split
    assert [len(b) for b in check_stage.pair_batches(qs, 1, served=False)] == [3, 2, 5]
    assert check_stage.pair_batches(qs, 5, served=True) == [qs] and check_stage.pair_batches([], 5, False) == []


def test_curate_flow_runs_the_vlm_stages_through_launched_servers(finished_run, runs_dir, tiny_models, tmp_path,
                                                                   monkeypatch):
    """critique, instruct and filter each launch `transformers serve` (one stage at a time: the
    resident slot stops a stage's server before the next stage starts its own)."""
    from run_sizes import ONE_REWARD
    from test_curate_flow import curate_run

    from richpref.common.procs import registry_dir
    from richpref.run.storage import RunStore

    monkeypatch.setenv("RICHPREF_PID_DIR", str(tmp_path / "pids"))  # this test's servers only
    engine = "{backend: server, launch: transformers, startup_timeout_s: 240}"
    summary = curate_run(runs_dir, "served", tiny_models,
                         extra=[f"critique.engine={engine}", f"instruct.engine={engine}", f"check.engine={engine}",
                                "source.limit=4", *ONE_REWARD])
    assert summary["state"] == "completed"
    assert list(registry_dir().glob("*.json")) == []  # every launched server was stopped
    served, ref = RunStore(str(runs_dir), "served"), RunStore(str(runs_dir), "ref")
    ref_critique = {r["item_id"]: r for r in ref.read_stage("critique").to_pylist()}
    for r in served.read_stage("critique").to_pylist():
        assert r["raw"] == ref_critique[r["item_id"]]["raw"]
    assert {r["p_source"] for r in served.read_stage("filter").to_pylist() if r["status"] == "ok"} <= {"answer"}
    assert {r["visible_source"] for r in served.read_stage("instruct").to_pylist()} <= {"answer", None}


def test_each_image_is_encoded_once_by_the_request_worker_that_needs_it(monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from richpref.models import vlm_client

    calls: list[str] = []
    encode = vlm_client.image_data_url
    monkeypatch.setattr(vlm_client, "image_data_url",
                        lambda im, caps: calls.append(threading.current_thread().name) or encode(im, caps))
    a, b = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    urls = vlm_client._DataUrls([a, a, b, a, b, b], None)  # several questions about each image
    assert calls == []  # nothing encoded up front, before the first request
    with ThreadPoolExecutor(6, thread_name_prefix="request") as pool:
        out = list(pool.map(urls.__getitem__, range(6)))
    assert len(calls) == 2 and all(name.startswith("request") for name in calls)
    assert out[0] == out[1] == out[3] == encode(a) and out[2] == out[4] == out[5] == encode(b)
