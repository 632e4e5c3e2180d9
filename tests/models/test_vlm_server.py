"""Serving details: vLLM launched with a context sized for the stage (`--max-model-len`), and the
launcher in the key of the stages that read answer probabilities (check, the vlm_score reward)."""
from __future__ import annotations

import json

import pytest

from richpref.models.vlm_server import image_tokens, launch_command, stage_max_model_len
from richpref.schemas.config import load_profile
from richpref.schemas.serving import EngineConfig, ImageCaps


def _qwen25_vl(folder):
    """The two config files of Qwen/Qwen2.5-VL-7B-Instruct that size its context, as published."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_processor_type": "Qwen2_5_VLImageProcessor"}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["Qwen2_5_VLForConditionalGeneration"],
                                                    "max_position_embeddings": 128000}))
    return str(folder)


def _llava_ov(folder):
    folder.mkdir(parents=True, exist_ok=True)
    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    (folder / "config.json").write_text(json.dumps({
        "image_grid_pinpoints": pinpoints, "vision_config": {"image_size": 384, "patch_size": 14},
        "text_config": {"max_position_embeddings": 32768}}))
    return str(folder)


def test_qwen25_vl_gets_a_context_for_one_image_not_128k(tmp_path):
    path = _qwen25_vl(tmp_path / "qwen")
    assert image_tokens(path) == 16384  # 12845056 / 28²
    n = stage_max_model_len(path, max_new_tokens=64)
    assert n == 23552  # ceil((2048 + 16384 + 64) x 1.25 / 1024) x 1024
    assert n < 128000
    capped = stage_max_model_len(path, max_new_tokens=64, caps=ImageCaps(max_pixels=1024 * 28 * 28))
    assert capped == 4096  # (2048 + 1024 + 64) x 1.25 = 3920 -> 4096
    cmd = launch_command("vllm", path, "qwen", 8000, max_model_len=n)
    assert cmd[cmd.index("--max-model-len") + 1] == "23552"
    # The user's own --max-model-len wins; SGLang and transformers serve take none.
    own = launch_command("vllm", path, "qwen", 8000, max_model_len=n, extra_args=["--max-model-len", "8192"])
    assert own.count("--max-model-len") == 1 and own[-1] == "8192"
    assert "--max-model-len" not in launch_command("sglang", path, "qwen", 8000, max_model_len=n)


def test_llava_onevision_and_unknown_layouts(tmp_path):
    path = _llava_ov(tmp_path / "ov")
    assert image_tokens(path) == round((9 + 1) * 729 * 1.1 + 0.5)  # anyres_max_9 + base view
    assert image_tokens(path, ImageCaps(max_tiles=4)) == round(5 * 729 * 1.1 + 0.5)
    assert stage_max_model_len(path, max_new_tokens=256) <= 32768
    assert image_tokens(str(tmp_path / "nothing-here")) == 8192


def test_the_launched_server_passes_the_stage_context(tmp_path, monkeypatch):
    """What `connect` hands the launcher (no process is started: `start` is replaced)."""
    from richpref.models import vlm_client, vlm_server

    seen = {}

    def start(self):
        seen["cmd"] = launch_command(self.launch, self.model_path, self.served_name, 1, max_model_len=self.max_model_len)
        return self

    monkeypatch.setattr(vlm_server.LaunchedServer, "start", start)
    path = _qwen25_vl(tmp_path / "qwen")
    vlm_client.connect(EngineConfig(backend="server", launch="vllm"), path, max_new_tokens=64)
    assert seen["cmd"][seen["cmd"].index("--max-model-len") + 1] == "23552"
    vlm_client.connect(EngineConfig(backend="server", launch="vllm", max_model_len=4096), path, max_new_tokens=64)
    assert seen["cmd"][seen["cmd"].index("--max-model-len") + 1] == "4096"


def _key(stage_name: str, overrides: list[str]) -> str:
    from richpref.run.runner import content_key
    from richpref.tasks import ALL_STAGES

    stage = next(s for s in ALL_STAGES if s.name == stage_name)
    profile = load_profile("tiny", overrides)
    return content_key(stage, profile, 0, {name: type("M", (), {"key": "k"})() for name in stage.reads})


@pytest.mark.parametrize("section, stage", [("check", "check")])
def test_switching_launcher_recomputes_check_the_endpoint_alone_does_not(section, stage):
    vllm = _key(stage, [f"{section}.engine.backend=server", f"{section}.engine.launch=vllm"])
    serve = _key(stage, [f"{section}.engine.backend=server", f"{section}.engine.launch=transformers"])
    sglang = _key(stage, [f"{section}.engine.backend=server", f"{section}.engine.launch=sglang"])
    assert len({vllm, serve, sglang}) == 3
    a = _key(stage, [f"{section}.engine.backend=server", f"{section}.engine.endpoint=http://10.0.0.1:8000/v1"])
    b = _key(stage, [f"{section}.engine.backend=server", f"{section}.engine.endpoint=http://10.0.0.2:9000/v1",
                     f"{section}.engine.concurrency=3"])
    assert a == b
    # the launcher is no part of critique's key (its text answers are not probabilities)
    assert _key("critique", ["critique.engine.backend=server", "critique.engine.launch=vllm"]) == \
        _key("critique", ["critique.engine.backend=server", "critique.engine.launch=transformers"])


def test_switching_a_vlm_score_rewards_launcher_recomputes_score():
    from richpref.schemas.config import ScoreConfig
    from richpref.tasks.score import scoring_view

    def view(engine):
        cfg = ScoreConfig(rewards={"vlm_score": {"kind": "vlm_score", "model": "qwen", "engine": engine}})
        return scoring_view(cfg)

    assert view({"backend": "server", "launch": "vllm"}) != view({"backend": "server", "launch": "transformers"})
    assert view({"backend": "server", "endpoint": "http://a:1/v1"}) == view({"backend": "server", "endpoint": "http://b:2/v1"})
