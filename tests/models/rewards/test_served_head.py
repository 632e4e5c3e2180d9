"""The head judges (hpsv3, edit_reward) through richpref's judge server against the same judges
in-process, on the tiny twins: the same scores (<= 1e-5).

Two real servers on 127.0.0.1: edit_reward's started by `richpref serve judge` (as a user would,
then used as an endpoint), hpsv3's launched by the reward itself (`engine.launch: richpref`). The
servers start first and load while the in-process judges score. Each is stopped by its pid and
checked gone.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from richpref.common.procs import spawn_owned, stop_owned, wait_healthy
from richpref.models.rewards import load_reward, load_reward_spec
from richpref.common.procs import free_port
from richpref.schemas.relabel import RewardSpec
from richpref.schemas.serving import EngineConfig
from process_helpers import gone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a red bicycle leaning against a yellow brick wall", "three green apples", "a cat on a mat"]
INSTRUCTIONS = ["make the wall blue", "add a small boat", "remove the mat"]


def images(seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 64), (48, 90), (56, 40))]


def test_head_judges_served_score_as_in_process(tiny_models, tmp_path):
    er = tiny_models / "edit-reward"
    port = free_port()
    cli = [sys.executable, "-m", "richpref.cli.commands", "--data-dir", str(tmp_path), "serve", "judge", "--kind", "edit_reward", "--model", str(er),
           "--backbone", str(er / "base"), "--device", "cpu", "--dtype", "float32", "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = spawn_owned(cli, name="judge-server-test", log_path=str(tmp_path / "judge.log"), env=env)
    launched = None
    hps_spec = dict(kind="hpsv3", model="hpsv3", backbone="hpsv3/base")
    launch = EngineConfig(backend="server", launch="richpref", startup_timeout_s=120, retries=1)
    pool = ThreadPoolExecutor(1)  # the reward launches its server while the in-process judges score
    starting = pool.submit(load_reward_spec, RewardSpec(**hps_spec, engine=launch), str(tiny_models), device="cpu",
                           dtype="float32")
    try:
        local_hps = load_reward_spec(RewardSpec(**hps_spec), str(tiny_models), device="cpu", dtype="float32")
        want_hps = local_hps.score(images(1), PROMPTS, batch_size=2)
        local_er = load_reward("edit_reward", str(er), backbone=str(er / "base"), device="cpu", dtype="float32")
        originals, edits = images(2), images(3)
        want_er = local_er.score_pairs(originals, edits, INSTRUCTIONS, batch_size=2)

        launched = starting.result()
        got_hps = launched.score(images(1), PROMPTS, batch_size=2)
        np.testing.assert_allclose(got_hps, want_hps, rtol=0, atol=1e-5)
        assert launched.dtype == "float32" and np.ptp(want_hps) > 1e-6

        url = f"http://127.0.0.1:{port}/v1"
        wait_healthy(url.removesuffix("/v1"), "richpref serve judge", proc, timeout=120.0)
        # Through a profile's spec: the weights live with the server, not here (a Hub id this machine lacks).
        spec = RewardSpec(kind="edit_reward", model="TIGER-Lab/EditReward-not-here",
                          engine=EngineConfig(backend="server", endpoint=url, retries=0))
        served_er = load_reward_spec(spec, str(tiny_models), device="cpu")
        got_er = served_er.score_pairs(originals, edits, INSTRUCTIONS, batch_size=2)
        served_er.close()
        np.testing.assert_allclose(got_er, want_er, rtol=0, atol=1e-5)
        assert served_er.model_id == str(er.resolve())  # what the server judges with
        # A bad request is the request's fault, named: 400 with why.
        r = httpx.post(f"{url}/score", json={"images": [], "prompts": []})
        assert r.status_code == 400 and "POST /v1/score_edits" in r.json()["error"]
        # A client of a server that judges another kind refuses it before any score.
        with pytest.raises(RuntimeError, match="judges 'edit_reward', not 'hpsv3'"):
            load_reward("hpsv3", "hpsv3", engine=EngineConfig(backend="server", endpoint=url, retries=0))
    finally:
        stop_owned(proc, timeout=15.0)
        launched = launched or starting.result()  # a start that failed raises here (its server already stopped)
        pool.shutdown()
        pid = launched.server.pid
        launched.close()
    assert gone(proc.pid), "richpref serve judge outlived its stop"
    assert gone(pid), "a launched judge server outlived its judge"


def test_engine_launchers_fit_what_they_serve():
    with pytest.raises(ValueError, match="serves chat answers, not a reward head"):
        RewardSpec(kind="hpsv3", model="m", engine=EngineConfig(backend="server", launch="vllm"))
    with pytest.raises(ValueError, match="head judges .* only"):
        RewardSpec(kind="vlm_score", model="m", engine=EngineConfig(backend="server", launch="richpref"))
    from richpref.schemas.config import CritiqueConfig

    with pytest.raises(ValueError, match="critique: engine.launch=richpref"):
        CritiqueConfig(engine={"backend": "server", "launch": "richpref"})
    RewardSpec(kind="edit_reward", model="m", engine=EngineConfig(backend="server", endpoint="http://h:1/v1"))


def test_doctor_looks_for_no_weights_of_a_judge_served_at_an_endpoint():
    from richpref.doctor.checks import model_refs
    from richpref.schemas.config import load_profile

    p = load_profile("tiny-rebuild")
    judge = RewardSpec(kind="hpsv3", model="MizzenAI/HPSv3", engine=EngineConfig(backend="server", endpoint="http://gpu:8700/v1"))
    score = p.score.model_copy(update={"rewards": {**p.score.rewards, "hpsv3": judge}})
    fields = [r.field for r in model_refs(p.model_copy(update={"score": score}))]
    assert "score.rewards.imagereward.model" in fields and not any("hpsv3" in f for f in fields)
