"""How the commands refuse an input: a RUN name that is no plain folder name is a usage error of every
command that takes one (exit 2, the rule in one line), never a traceback; a rounds config whose name
makes such run names is refused before its flow starts; a folder argument that is a file, or a data dir
that cannot be made, is one line too; so is a stage device this machine lacks (doctor, curate), and a
judge server's missing checkpoint or busy port, a stage's prompt template or tuned weights that are not
there (before Prefect starts); a count below its least (workers, processes,
restarts; machines: tests/training/test_launcher.py) is a usage error before anything runs."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from richpref.cli.commands import main


@pytest.mark.parametrize("command", [
    ["curate", "--profile", "tiny", "--plan", "--run", "{}"],
    ["relabel-dataset", "src.parquet", "out", "--run", "{}"],
    ["export", "{}", "--format", "pickapic", "--out", "out"],
    *([view, "{}"] for view in ("summary", "status", "report", "card", "inspect")),
])
@pytest.mark.parametrize("run", ["../up", ".hidden"])
def test_a_run_name_that_is_no_plain_folder_name_is_a_usage_error_of_every_command(command, run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--data-dir", str(tmp_path), *(run if a == "{}" else a for a in command)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err  # before: a ValueError traceback (exit 1) from the run store
    assert f"run name {run!r} is not allowed: use letters, digits, '.', '_' or '-', starting with a letter" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_a_rounds_name_that_makes_no_plain_run_name_is_refused_before_prefect_starts(tiny_models, tmp_path, capsys):
    args = ["--data-dir", str(tmp_path), "rounds", "--config", "rounds-tiny", "--models-root", str(tiny_models)]
    for name, run in (("../x", "../x-round-2"), ("r" * 121, "r" * 121 + "-round-2")):
        assert main([*args, "--set", f"name={name}"]) == 2  # before: the rounds flow started, then a ValueError
        err = capsys.readouterr().err
        assert f"run name {run!r} is not allowed" in err and "Flow run" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [
    ["relabel-dataset", "src.parquet", "{}"],
    ["export", "r", "--format", "pickapic", "--out", "{}"],
    ["finetune", "--output-dir", "{}"],
    ["evaluate", "--output-dir", "{}"],
    ["models", "build-tiny", "{}"],
    ["models", "convert-llava-critic", "src", "{}"],
])
def test_a_folder_argument_that_is_a_file_is_a_usage_error(command, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(SystemExit) as exit_:  # before: FileExistsError / NotADirectoryError tracebacks
        main(["--data-dir", str(tmp_path / "data"), *(str(file) if a == "{}" else a for a in command)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{file} is a file, not a folder; give a folder (created when missing)" in err, err


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    for data, cause in ((tmp_path / "a-file", "[Errno 17] File exists"), (tmp_path / "a-file" / "data", "[Errno 20] Not a directory")):
        assert main(["--data-dir", str(data), "summary", "r"]) == 2  # before: FileExistsError / NotADirectoryError
        assert capsys.readouterr().err.startswith(f"error: data dir {data} cannot be made ({cause}")


@pytest.mark.parametrize("command", [
    ["curate", "--profile", "tiny", "--run", "r", "--set", "critique.template=nosuch"],
    ["doctor", "--profile", "tiny", "--set", "critique.template=nosuch"],
    ["curate", "--profile", "tiny", "--run", "r", "--set", "sample.lora={tmp}/no-lora"],
    ["rounds", "--set", 'curate_overrides=["instruct.visible_template=nosuch"]'],
    ["relabel-dataset", "{tmp}/pairs.parquet", "{tmp}/out", "--reward", "vlm_score", "--set",
     "score.rewards.vlm_score.template=nosuch"],
])
def test_what_a_stage_key_reads_that_is_not_there_is_refused_before_prefect_starts(command, tiny_models, tmp_path,
                                                                                     capsys):
    # before, the stages ahead of it ran first, then the flow failed with a traceback
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [1.0]}), tmp_path / "pairs.parquet")
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    assert main(["--data-dir", str(tmp_path / "data"), *args, "--models-root", str(tiny_models)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(("error: critique: template 'nosuch' not found", "error: instruct: template 'nosuch' not found",
                           "error: score: template 'nosuch' not found", "error: sample: LoRA weights")), err
    assert not list(tmp_path.glob("**/runs/*"))


@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a CUDA device")
def test_a_stage_device_this_machine_lacks_is_refused_before_any_model_loads(tiny_models, tmp_path, capsys):
    root = ["--models-root", str(tiny_models)]
    assert main(["--data-dir", str(tmp_path), "doctor", "--profile", "tiny", "--device", "cuda", *root]) == 2
    assert capsys.readouterr().err.strip() == (  # before: torch's "Found no NVIDIA driver" traceback mid-doctor
        "error: sample.device 'cuda': torch sees no CUDA device here; set sample.device to auto or cpu "
        "(doctor: --device cpu), or run on a machine that has it")
    assert main(["--data-dir", str(tmp_path), "curate", "--profile", "tiny", "--run", "r", "--set", "critique.device=gpu",
                 *root]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: critique.device 'gpu': 'gpu' is no device name") and "Flow run" not in err


def test_a_judge_servers_missing_checkpoint_or_busy_port_is_one_line(tiny_models, tmp_path, capsys):
    import socket

    judge = ["serve", "judge", "--kind", "hpsv3", "--models-root", str(tiny_models)]
    assert main(["--data-dir", str(tmp_path), *judge, "--model", str(tmp_path / "none"), "--port", "0"]) == 3
    assert capsys.readouterr().err.startswith(f"error: model '{tmp_path / 'none'}' not found")  # before: a traceback
    assert main(["--data-dir", str(tmp_path), *judge, "--model", "hpsv3", "--backbone", "qwen2.5-vl", "--port", "0"]) == 3
    assert "this reward needs 'qwen2_vl'" in capsys.readouterr().err  # a backbone of another family
    # before the judge loads; before, a ValueError or RuntimeError traceback (the last after the base loaded)
    for flag, message in ((["--template", "nosuch"], "error: --template: template 'nosuch' not found; available: "),
                          (["--template", "critique_v1"], "error: --template: template 'critique_v1' has fields ['prompt'] and 0 "),
                          (["--device", "gpu"], "error: --device 'gpu': 'gpu' is no device name"),
                          (["--device", "cuda:99"], "error: --device 'cuda:99': "),
                          (["--quality-template", "x"], "error: --quality-template is edit_reward's")):
        assert main(["--data-dir", str(tmp_path), *judge, "--model", "hpsv3", "--port", "0", *flag]) == 2, flag
        assert capsys.readouterr().err.startswith(message), flag
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["--data-dir", str(tmp_path), *judge, "--model", "hpsv3", "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: port {port} on 127.0.0.1 is in use (another server listens there): stop it, or give --port")


@pytest.mark.parametrize("command,message", [
    (["curate", "--profile", "tiny", "--run", "r", "--workers", "-2"], "argument --workers/--dask-workers: -2 is below 1"),
    (["curate", "--profile", "tiny", "--run", "r", "--workers", "two"], "'two' is not a whole number"),
    (["finetune", "--num-processes", "0"], "argument --num-processes: 0 is below 1"),  # before: the flow started
    (["finetune", "--max-restarts", "-1"], "argument --max-restarts: -1 is below 0"),
    (["serve", "--port", "70000"], "argument --port: 70000 is above 65535, the last TCP port"),  # before: OverflowError
    (["finetune", "--main-process-port", "-1"], "argument --main-process-port: -1 is below 0"),
    (["doctor", "--items", "0"], "argument --items: 0 is below 1"),  # before: exit 1, after the config loaded
    # the judge server's own parser (before: an OverflowError traceback; a batch of 0 taken after the judge loaded)
    (["serve", "judge", "--kind", "hpsv3", "--model", "m", "--port", "-1"], "argument --port: -1 is below 0"),
    (["serve", "judge", "--kind", "hpsv3", "--model", "m", "--batch-size", "0"], "argument --batch-size: 0 is below 1"),
])
def test_a_count_below_its_least_is_a_usage_error(command, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # before: --workers -2 ran a whole curate on one worker
        main(["--data-dir", str(tmp_path / "data"), *command])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", [["doctor", "--json", "{}"], ["report", "r", "--out", "{}"]])
def test_a_file_argument_that_is_a_folder_or_lies_under_a_file_is_a_usage_error(command, tmp_path, capsys):
    # before: the doctor ran every model, then an IsADirectoryError traceback; the report was built, then refused
    file = tmp_path / "a-file"
    file.write_text("x")
    for path, message in ((tmp_path, f"{tmp_path} is a folder; give a file path"),
                          (file / "out.json", f"{file / 'out.json'}: {file} is a file, not a folder")):
        with pytest.raises(SystemExit) as exit_:
            main(["--data-dir", str(tmp_path / "data"), *(str(path) if a == "{}" else a for a in command)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_the_argument_types_take_their_bounds_and_look_up_to_the_first_folder_that_exists(tmp_path):
    import argparse

    from richpref.cli.errors import data_folder, folder, output_file
    from richpref.common.argtypes import at_least, port

    assert at_least(1)("1") == 1 and port("0") == 0 and port("65535") == 65535
    with pytest.raises(argparse.ArgumentTypeError, match="65536 is above 65535"):
        port("65536")
    nested = str(tmp_path / "new" / "deeper" / "report.html")  # folders made when written
    assert output_file(nested) == nested
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match=f"{tmp_path / 'a-file'} is a file, not a folder"):
        output_file(str(tmp_path / "a-file" / "sub" / "out.json"))
    # a run's data dir may be a URL; a folder the command writes itself (export, checkpoints) may not
    assert data_folder("s3://bucket/data") == "s3://bucket/data"
    with pytest.raises(argparse.ArgumentTypeError, match="s3://bucket/out: this command writes a local folder"):
        folder("s3://bucket/out")  # before, `export --out s3://...` wrote ./s3:/bucket/out


def test_ctrl_c_ends_a_command_in_one_line_that_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    # before, a traceback from wherever the interrupt landed (a Dask wait, the Prefect server's start)
    import richpref.ops.entrypoints as entrypoints

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(entrypoints, "run_flow", interrupted)
    monkeypatch.setattr("richpref.training.evaluation.preflight", lambda cfg: None)
    assert main(["--data-dir", str(tmp_path), "evaluate", "--config", "evaluate-tiny"]) == 130
    assert capsys.readouterr().err == ("interrupted: the work already committed is kept; run the same command again "
                                       "to go on from there\n")


@pytest.mark.parametrize("command", [["finetune", "--config", "finetune-tiny", "--pairs", "{pairs}"],
                                     ["evaluate", "--config", "evaluate-tiny"], ["rounds"]])
def test_a_data_dir_on_an_object_store_is_no_home_for_local_outputs(command, tiny_models, tmp_path, capsys, monkeypatch):
    # before, the checkpoints, images or tables went to a local folder named `s3:/bucket/data/...`
    import richpref.common.objstore as objstore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(objstore, "check_reachable", lambda url: None)  # the store itself is not the point
    pairs = tmp_path / "pairs.parquet"  # the preflight reads footers, not images
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [1.0]}), pairs)
    args = [a.replace("{pairs}", str(pairs)) for a in command]
    assert main(["--data-dir", "s3://bucket/data", *args, "--models-root", str(tiny_models)]) == 2
    assert f"{command[0]} writes a local folder, and the data dir s3://bucket/data is not one" in capsys.readouterr().err
    assert not (tmp_path / "s3:").exists()
