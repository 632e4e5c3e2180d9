"""`richpref doctor`: a tiny run through every stage with its cost table, and models that cannot load
failing fast with their cause and fix before anything starts."""
from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import yaml

from richpref.cli.commands import main
from richpref.doctor.measure import START_ROW, StageCost, project, project_total, steady_rate
from richpref.doctor.checks import weight_files, weights_bytes
from richpref.models.runtime import resident
from richpref.tasks import PIPELINE

REPO = Path(__file__).resolve().parents[2]
STAGES = ["source"] + [s.name for s in PIPELINE]


def _profile(tmp_path: Path, tiny_models: Path, base: str = "tiny", **sections) -> str:
    data = yaml.safe_load((REPO / "configs" / f"{base}.yaml").read_text())
    data["models_root"] = str(tiny_models)
    data["source"]["path"] = str(REPO / data["source"]["path"])
    for section, values in sections.items():
        data[section].update(values)
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def flow_report(tiny_models, prefect_harness, tmp_path_factory):
    """The doctor flow once on the tiny profile: 2 items, projected to 1000 on 2 workers."""
    spec = importlib.util.spec_from_file_location("doctor_flow", REPO / "flows" / "doctor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = _profile(tmp_path_factory.mktemp("doctor"), tiny_models)
    return module.doctor(profile=path, items=2, project_items=1000, workers=2)


def test_doctor_measures_every_stage_of_the_tiny_profile(flow_report):
    stages = flow_report["stages"]
    assert [s["stage"] for s in stages] == STAGES
    for s in stages:
        assert s["items"] == 2 and s["compute_s"] > 0 and s["peak_rss_mib"] > 100, s["stage"]
        assert s["disk_bytes"] > 0, s["stage"]
        assert s["projected"]["hours_per_worker"] > 0
    by = {s["stage"]: s for s in stages}
    for name in ("sample", "critique", "instruct", "edit", "cutout", "check", "score"):  # the stages that load models
        assert by[name]["models"] and by[name]["load_s"] > 0, name
    assert by["export"]["models"] == [] and by["filter"]["models"] == [] and by["relabel"]["models"] == []
    assert "pickscore:pickscore" in by["score"]["models"]
    # Images are the bulk of a run's bytes.
    assert by["sample"]["disk_bytes"] > 3 * by["critique"]["disk_bytes"]
    total = flow_report["total"]
    start = flow_report["start_s"]  # apart from the first model stage's load; once per worker (2)
    assert start > 0 and flow_report["start_devices"] == ["cpu"]
    assert total["worker_hours"] == pytest.approx(sum(s["projected"]["worker_hours"] for s in stages) + 2 * start / 3600)
    assert resident._key is None  # the last stage's models were released


def test_doctor_flow_writes_a_table_artifact(flow_report):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    import asyncio

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["doctor-tiny"])))

    artifacts = asyncio.run(read())
    assert artifacts and artifacts[0].type == "table"
    rows = json.loads(artifacts[0].data) if isinstance(artifacts[0].data, str) else artifacts[0].data
    assert [r["stage"] for r in rows] == STAGES[:1] + [START_ROW] + STAGES[1:] + ["total"]
    assert {"load_s", "peak_rss_mib", "items_per_s", "hours_per_worker", "worker_hours", "disk_kib_per_item"} <= set(rows[0])


def test_projection_by_hand():
    cost = StageCost("edit", ["m"], "cpu", 0.0, load_s=30.0, items=8, rows=8, shards=2, compute_s=5.0, warmup_s=6.0,
                     s_per_item=0.5, peak_rss_mib=1.0, gpu_peak_mib=None, disk_bytes=8000)
    one = project(cost, 1000, 1)
    assert one["hours_per_worker"] == pytest.approx((30 + 6 + 1000 * 0.5) / 3600)
    four = project(cost, 1000, 4)
    assert four["hours_per_worker"] == pytest.approx((36 + 250 * 0.5) / 3600)
    assert four["worker_hours"] == pytest.approx((4 * 36 + 500) / 3600)
    assert four["disk_gb"] == pytest.approx(1000 * 1000 / 1e9)
    # A worker's start (imports, device) once per worker, on top of its stages.
    other = StageCost("score", ["r"], "cpu", 0.0, load_s=2.0, items=8, rows=8, shards=2, compute_s=1.0, warmup_s=0.0,
                      s_per_item=0.1, peak_rss_mib=3.0, gpu_peak_mib=None, disk_bytes=0)
    for c in (cost, other):
        c.projected = project(c, 1000, 4)
    total = project_total([cost, other], 9.0, 4)
    assert total["hours_per_worker"] == pytest.approx((36 + 125 + 2 + 25 + 9) / 3600)
    assert total["worker_hours"] == pytest.approx((4 * 36 + 500 + 4 * 2 + 100 + 4 * 9) / 3600)
    assert total["peak_rss_mib"] == 3.0 and "gpu_peak_mib" not in total
    assert total["disk_gb"] == pytest.approx(1000 * 1000 / 1e9) and total["disk_bytes_per_item"] == pytest.approx(8000 / 8)
    other.gpu_peak_mib, cost.gpu_peak_mib = 700.0, 300.0  # the largest device peak of any stage
    assert project_total([cost, other], 9.0, 4)["gpu_peak_mib"] == 700.0
    one_item = StageCost("x", [], "cpu", 0.0, load_s=0.0, items=1, rows=1, shards=1, compute_s=1.0, warmup_s=0.0,
                         s_per_item=1.0, peak_rss_mib=1.0, gpu_peak_mib=None, disk_bytes=500)
    assert project(one_item, 10, 1)["disk_gb"] == pytest.approx(5000 / 1e9)
    # Shards after the first give the rate; the first one's excess is warm-up.
    assert steady_rate([5.0, 2.0, 2.0], [4, 4, 4]) == pytest.approx((3.0, 0.5))
    assert steady_rate([5.0, 2.0, 3.0], [2, 4, 6]) == pytest.approx((4.0, 0.5))  # 5 s - 0.5 s/item * 2 items
    assert steady_rate([5.0, 2.0], [4, 4]) == pytest.approx((3.0, 0.5))  # two shards suffice
    assert steady_rate([1.0, 2.0], [4, 4]) == (0.0, 0.5)  # a first shard faster than the rate: no warm-up
    assert steady_rate([5.0, 0.1], [4, 0]) == pytest.approx((0.0, 5.1 / 4))  # later shards with no items: all steady
    assert steady_rate([3.0], [6]) == (0.0, 0.5)
    assert steady_rate([3.0], [1]) == (0.0, 3.0)


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header, offset = {}, 0
    sizes = {"F32": 4, "F16": 2, "I64": 8}
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_weight_bytes_from_safetensors_headers(tmp_path):
    unet = tmp_path / "unet"
    _safetensors(unet / "diffusion_pytorch_model.safetensors", {"w": ("F32", [10, 10]), "steps": ("I64", [3])})
    _safetensors(unet / "diffusion_pytorch_model.fp16.safetensors", {"w": ("F16", [10, 10]), "steps": ("I64", [3])})
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"x" * 999)  # a .bin copy beside safetensors: not read
    (unet / "config.json").write_text("{}")  # no weights
    assert [f.name for f in weight_files(str(tmp_path))] == ["diffusion_pytorch_model.safetensors"]
    assert [f.name for f in weight_files(str(tmp_path), "fp16")] == ["diffusion_pytorch_model.fp16.safetensors"]
    # Floats cast to the stage's dtype; integer tensors stay as stored.
    assert weights_bytes(str(tmp_path), "float32") == 100 * 4 + 3 * 8
    assert weights_bytes(str(tmp_path), "float16") == 100 * 2 + 3 * 8
    assert weights_bytes(str(tmp_path), "auto", "cuda") == 100 * 2 + 3 * 8
    assert weights_bytes(str(tmp_path), "auto", "cpu") == 100 * 4 + 3 * 8


def _doctor(capsys, profile: str, *extra: str) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    rc = main(["--data-dir", str(Path(profile).parent / "data"), "doctor", "--profile", profile, "--items", "2", *extra])
    return rc, capsys.readouterr().err, time.perf_counter() - t0


def test_a_missing_model_fails_fast_with_the_download_command(tiny_models, tmp_path, capsys):
    resident.release()
    profile = _profile(tmp_path, tiny_models, critique={"model": "nobody/missing-critic-7b"})
    rc, err, seconds = _doctor(capsys, profile)
    assert rc == 3 and seconds < 30
    assert "critique: model 'nobody/missing-critic-7b' cannot be loaded" in err
    assert "huggingface-cli download nobody/missing-critic-7b" in err and "HF_HUB_OFFLINE=1" in err
    assert ("fix: download it on a connected machine: `huggingface-cli download nobody/missing-critic-7b` (then copy "
            "the Hugging Face cache here), or point critique.model at a local directory") in err
    # Nothing else started: no stage ran, no model was loaded.
    assert "doctor: sample:" not in err and resident._key is None


def test_a_missing_local_model_names_the_path_and_the_build_command(tiny_models, tmp_path, capsys):
    profile = _profile(tmp_path, tiny_models, edit={"controlnet": "no-such-controlnet"})
    rc, err, _ = _doctor(capsys, profile)
    assert rc == 3 and "edit: model 'no-such-controlnet'" in err and "edit.controlnet" in err
    assert ("fix: point edit.controlnet at an existing directory or a Hub id 'owner/name'; for the tiny profile run "
            "`richpref models build-tiny <models_root>`") in err  # a path, not a Hub id: no download to suggest


def test_a_native_llava_checkpoint_names_the_converter(tiny_models, tmp_path, capsys):
    native = tmp_path / "llava-critic-7b"
    native.mkdir()
    (native / "config.json").write_text(json.dumps({"architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen"}))
    profile = _profile(tmp_path, tiny_models, critique={"model": str(native)})
    rc, err, seconds = _doctor(capsys, profile)
    assert rc == 3 and seconds < 30
    assert f"richpref models convert-llava-critic {native} {native}-hf" in err
    assert f"critique.model={native}-hf" in err


def test_weights_larger_than_free_memory_name_the_dtype_and_batch_settings(tiny_models, tmp_path, capsys, monkeypatch):
    from richpref.doctor import checks as doctor_checks

    monkeypatch.setattr(doctor_checks, "available_bytes", lambda device: 1024)  # a 1 KiB machine
    profile = _profile(tmp_path, tiny_models)
    rc, err, _ = _doctor(capsys, profile)
    assert rc == 3 and "sample: model 'sd15' cannot be loaded" in err and "GiB free" in err  # its own model alone
    assert "--set sample.dtype=float16" in err and "sample.batch_size (now 8)" in err


def test_a_bad_profile_fails_before_any_model(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsample: {stepz: 3}\n")
    rc, err, _ = _doctor(capsys, str(bad))
    assert rc == 2 and "stepz" in err


def test_a_missing_package_names_the_install(tiny_models):
    from richpref.doctor.measure import _load_problem
    from richpref.schemas.config import load_profile

    exc = ModuleNotFoundError("No module named 'platformdirs'", name="platformdirs")
    problem = _load_problem("cutout", [], exc, load_profile("tiny", None, str(tiny_models)))
    assert problem.kind == "missing_package" and "pip install platformdirs" in problem.fix


def test_doctor_measures_the_rebuild_stages_and_checks_their_judges(tiny_models, tmp_path, capsys):
    from richpref.doctor.measure import run_doctor
    from richpref.schemas.config import load_profile

    resident.release()
    profile = load_profile(_profile(tmp_path, tiny_models, "tiny-rebuild"), None, str(tiny_models))
    report = run_doctor(profile, items=1, project_items=100, scratch_dir=str(tmp_path / "scratch"))
    by = {s.stage: s for s in report.stages}
    assert list(by) == ["source", "samples", "rewards", "ranked", "rebuild_export"]
    # Doctor computed its scratch run through the shard runner: committed for the keys a run has, in the work log.
    from richpref.doctor.measure import scratch_profile
    from richpref.run.plan import plan_run
    from richpref.run.storage import RunStore

    assert plan_run(scratch_profile(profile, 1), str(tmp_path / "scratch"), "doctor").up_to_date
    assert [r["stage"] for r in RunStore(str(tmp_path / "scratch"), "doctor").read_log("work.jsonl")] == list(by)
    assert by["samples"].rows == 4 and by["ranked"].rows == 6  # sample.num_samples 4: 6 pairs of one prompt
    assert by["samples"].models and by["samples"].weights_gib > 0 and by["samples"].load_s > 0
    # score.rewards in the profile's order (the YAML written here sorts its keys)
    assert by["rewards"].models == ["hpsv2:hpsv2", "imagereward:imagereward", "pickscore:pickscore"]
    assert by["ranked"].models == [] and by["rebuild_export"].disk_bytes > 0 and resident._key is None
    # A judge whose checkpoint is missing fails before anything runs, naming the rebuild's stage, the file and the fix.
    judge = tmp_path / "hps-judge"
    shutil.copytree(tiny_models / "hpsv3" / "base", judge / "base")
    rewards = {**yaml.safe_load((REPO / "configs" / "tiny-rebuild.yaml").read_text())["score"]["rewards"],
               "hpsv3": {"kind": "hpsv3", "model": str(judge), "backbone": str(judge / "base")}}
    capsys.readouterr()  # the first doctor's output (its log lines, where an earlier test left Prefect's console handler)
    rc, err, seconds = _doctor(capsys, _profile(tmp_path, tiny_models, "tiny-rebuild", score={"rewards": rewards}))
    assert rc == 3 and "rewards: model" in err and f"{judge} holds no reward checkpoint 'HPSv3.safetensors'" in err
    assert f"--local-dir {judge}" in err and "score.rewards.hpsv3.file" in err and "doctor: samples:" not in err


def test_a_vlm_served_at_an_endpoint_is_neither_found_nor_fitted_here(tiny_models):
    """Its weights live on that server: a name only the server knows is no missing model here."""
    from richpref.doctor.checks import ModelProblem, model_refs, resolve_models
    from richpref.schemas.config import load_profile

    served = ["critique.model=no-such/critic", "critique.engine={backend: server, endpoint: 'http://127.0.0.1:9/v1'}"]
    profile = load_profile("tiny", served, str(tiny_models))
    assert "critique" not in {r.stage for r in model_refs(profile)}
    resolve_models(profile)
    with pytest.raises(ModelProblem, match="critique: model 'no-such/critic'"):
        resolve_models(load_profile("tiny", served[:1], str(tiny_models)))


def test_a_cutout_model_rembg_has_no_session_for_is_refused_before_any_stage(tiny_models):
    # before, the cut-out stage failed on it after sample, critique, instruct and edit had run
    from richpref.doctor.checks import ModelProblem, resolve_models
    from richpref.schemas.config import load_profile

    with pytest.raises(ModelProblem, match=r"(?s)'nosuch' is no rembg session; this rembg has .*\bsam\b.*"
                                           r"fix: set cutout.model to one of those sessions"):
        resolve_models(load_profile("tiny", ["cutout.model=nosuch"], str(tiny_models)))
    resolve_models(load_profile("tiny", ["cutout.model=sam"], str(tiny_models)), {"cutout"})  # rembg fetches its files


def test_a_stock_rembg_model_missing_offline_is_refused_naming_where_it_goes(tiny_models, tmp_path, monkeypatch):
    import re

    from richpref.doctor.checks import ModelProblem, resolve_models
    from richpref.schemas.config import load_profile

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("U2NET_HOME", "")  # the check sets it from cutout.home: restored after the test
    profile = load_profile("tiny", ["cutout.model=u2net", f"cutout.home={tmp_path}"], str(tiny_models))
    where = re.escape(f"expected its weights at {tmp_path}/models/u2net/u2net.onnx and we are offline")
    with pytest.raises(ModelProblem, match=f"(?s)cutout: model 'u2net' cannot be loaded.*{where}"):
        resolve_models(profile, {"cutout"})
    (tmp_path / "u2net.onnx").write_bytes(b"onnx")
    resolve_models(profile, {"cutout"})


def test_the_memory_fix_names_the_half_precision_each_model_takes(tiny_models):
    # bfloat16 for the VLMs and the flow-matching transformers (FLUX.1 overflows in float16), else float16
    from richpref.doctor.checks import memory_fix
    from richpref.schemas.config import load_profile

    def half(profile: str, stage: str) -> str:
        return memory_fix(stage, load_profile(profile, None, str(tiny_models))).split("dtype=")[1].split(";")[0]

    assert [half("tiny", s) for s in ("sample", "critique", "edit", "check")] == ["float16", "bfloat16", "float16", "bfloat16"]
    assert [half("tiny-flux-kontext", s) for s in ("sample", "edit")] == ["float16", "bfloat16"]
    assert [half("tiny-flux", s) for s in ("sample", "edit")] == ["bfloat16", "bfloat16"]


def test_only_the_models_of_the_stages_with_work_are_resolved(tiny_models, tmp_path):
    # a resumed run whose sample stage is done needs no sampler (curate resolves the stages its plan has work in)
    from richpref.doctor.checks import ModelProblem, resolve_models
    from richpref.schemas.config import load_profile

    profile = load_profile("tiny", [f"sample.model={tmp_path / 'gone'}"], str(tiny_models))
    resolve_models(profile, {"critique", "edit", "score"})
    with pytest.raises(ModelProblem, match="sample: model .*gone"):
        resolve_models(profile, {"sample", "edit"})
