"""Training on several machines: the `accelerate launch` command `richpref finetune --num-machines M
--machine-rank R --main-process-ip HOST` builds, checked against accelerate's own parser, the bad
inputs it refuses before anything starts, a real two-machine run (two `richpref finetune` processes
on this machine, one process group over gloo), a trainer that stops on bad input, not relaunched, and
one that keeps crashing, relaunched as often as asked."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from richpref.common.procs import free_port
from richpref.training.launcher import DEFAULT_MAIN_PORT, Machines, accelerate_command
from test_finetune import metrics, pairs_file, tiny_config, write_pairs  # noqa: F401 - pairs_file is a fixture


def _parsed(cmd: list[str]):
    from accelerate.commands.launch import launch_command_parser

    i = cmd.index("accelerate.commands.launch") + 1
    return launch_command_parser().parse_args(cmd[i:])


def test_each_machine_launches_its_rank_against_the_main_machine():
    cmd = accelerate_command("cfg.yaml", "out", num_processes=4, mixed_precision="bf16",
                             machines=Machines(3, 2, "10.224.24.1", 29501))
    args = _parsed(cmd)
    # accelerate counts processes over all machines: 4 GPUs on each of 3 machines.
    assert (args.num_machines, args.num_processes, args.machine_rank) == (3, 12, 2)
    assert (args.main_process_ip, args.main_process_port, args.multi_gpu) == ("10.224.24.1", 29501, True)
    assert args.training_script_args[-4:] == ["--config", "cfg.yaml", "--output-dir", "out"]


def test_one_process_per_machine_still_joins_the_group_on_a_fixed_port():
    args = _parsed(accelerate_command("c", "o", 1, machines=Machines(2, 0, "node0")))
    assert (args.num_machines, args.num_processes, args.machine_rank, args.multi_gpu) == (2, 2, 0, True)
    assert args.main_process_port == DEFAULT_MAIN_PORT  # all machines must name the same port


def test_one_machine_is_what_it_was():
    args = _parsed(accelerate_command("c", "o", 2))
    assert (args.num_machines, args.num_processes, args.machine_rank, args.main_process_ip) == (1, 2, None, None)
    assert args.multi_gpu is True and args.main_process_port > 0  # torchrun, on a port free here
    assert _parsed(accelerate_command("c", "o", 1)).multi_gpu is False


def test_fsdp_shards_every_process_of_every_machine_without_the_data_parallel_flag():
    one = _parsed(accelerate_command("c", "o", 2, fsdp=True))
    two = _parsed(accelerate_command("c", "o", 2, fsdp=True, machines=Machines(2, 1, "node0")))
    for args in (one, two):
        assert (args.use_fsdp, args.multi_gpu) == (True, False)  # accelerate takes one of the two
        assert (args.fsdp_sharding_strategy, args.fsdp_auto_wrap_policy) == ("FULL_SHARD", "TRANSFORMER_BASED_WRAP")
    assert (one.num_processes, one.main_process_port > 0) == (2, True)
    assert (two.num_processes, two.machine_rank, two.main_process_ip, two.main_process_port) == (4, 1, "node0", DEFAULT_MAIN_PORT)


def test_machines_come_from_the_environment_of_a_prefect_worker():
    env = {"RICHPREF_NUM_MACHINES": "2", "RICHPREF_MACHINE_RANK": "1", "RICHPREF_MAIN_PROCESS_IP": "node0"}
    assert Machines.from_env(env) == Machines(2, 1, "node0", None)
    assert Machines.from_env({}) == Machines()
    assert Machines.from_env(Machines(4, 3, "h", 1234).to_env()) == Machines(4, 3, "h", 1234)


@pytest.mark.parametrize("argv, message", [
    (["--num-machines", "2"], "needs --main-process-ip"),
    (["--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "h"], "outside 0..1"),
    (["--num-machines", "0"], "must be >= 1"),
])
def test_bad_machine_flags_fail_before_anything_starts(argv, message, capsys):
    from richpref.cli.commands import main

    assert main(["finetune", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_trainer_that_stops_on_bad_input_is_not_relaunched(tiny_models, tmp_path):
    from richpref.training.launcher import LaunchFailed, launch_training

    good = pq.read_table(write_pairs(tmp_path / "good.parquet", 4))
    jpg_1 = good.column("jpg_1").to_pylist()
    jpg_1[-1] = b"not an image"  # met only when the batch holding it is drawn
    path = tmp_path / "pairs.parquet"
    pq.write_table(good.set_column(good.schema.get_field_index("jpg_1"), "jpg_1", pa.array(jpg_1)), path)
    out = tmp_path / "run"
    cfg = tiny_config(tiny_models, path, train_batch_size=4, max_train_steps=2)
    with pytest.raises(LaunchFailed, match=rf"data source 'pairs' {path} row 3 jpg_1: cannot decode \(UnidentifiedImageError") as err:
        launch_training(cfg, out, max_restarts=2, log_file=str(tmp_path / "train.log"))
    assert "not relaunched" in str(err.value)
    assert (tmp_path / "train.log").read_text().count("Traceback") <= 1  # one launch, not three


def test_a_trainer_that_keeps_crashing_is_launched_once_and_max_restarts_times_more(tiny_models, tmp_path, monkeypatch):
    from richpref.training import launcher

    launches = tmp_path / "launches"
    crash = [sys.executable, "-c", f"open({str(launches)!r}, 'a').write('x'); raise SystemExit(3)"]
    monkeypatch.setattr(launcher, "accelerate_command", lambda *args: crash)  # the trainer, crashing at once
    cfg = tiny_config(tiny_models, write_pairs(tmp_path / "pairs.parquet", 2))
    with pytest.raises(launcher.LaunchFailed, match=r"failed 3 time\(s\) \(exit codes \[3, 3, 3\]\).*Launch again to resume"):
        launcher.launch_training(cfg, tmp_path / "run", max_restarts=2)
    assert launches.read_text() == "xxx"


def test_a_second_launch_on_an_output_folder_in_training_is_refused(tiny_models, pairs_file, tmp_path):  # noqa: F811
    # before, both trained into the folder, each resuming from and overwriting the other's checkpoints
    from richpref.training.launcher import LaunchFailed, launch_training

    out = tmp_path / "run"
    out.mkdir()
    hold = ("import sys, time\nfrom filelock import FileLock\nlock = FileLock(sys.argv[1])\nlock.acquire()\nprint('held', flush=True)\n"
            "time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out / ".launch-rank0.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another launch's trainers are running
        with pytest.raises(LaunchFailed, match=rf"^{out} is being trained by another launch on this machine \(rank 0\); "
                                               "wait for it to end, or give another --output-dir$"):
            launch_training(tiny_config(tiny_models, pairs_file), out)
        assert not (out / "finetune-config.yaml").exists()  # nothing of the held run was touched
    finally:
        holder.kill()
        holder.wait()


def _stop(proc: subprocess.Popen) -> None:
    """End a `richpref finetune` and everything it started (its own process group), by its pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_two_machines_train_as_one_process_group(tiny_models, pairs_file, prefect_api_env, tmp_path):  # noqa: F811 - the fixture imported above
    from safetensors.torch import load_file

    config = tmp_path / "ft.yaml"
    cfg = tiny_config(tiny_models, pairs_file.parent, max_train_steps=2, checkpointing_steps=1,
                      checkpoints_total_limit=1)
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "shared"  # the output folder both machines see
    port = free_port()
    # One Prefect API for both (a machine of its own would run its own server; two servers starting on
    # one SQLite file under one PREFECT_HOME race on its migrations).
    env = {**os.environ, **prefect_api_env, "OMP_NUM_THREADS": "1"}
    procs = []
    try:
        for rank in (0, 1):
            cmd = [sys.executable, "-m", "richpref.cli.commands", "finetune", "--config", str(config),
                   "--output-dir", str(out), "--num-machines", "2", "--machine-rank", str(rank),
                   "--main-process-ip", "127.0.0.1", "--main-process-port", str(port), "--max-restarts", "0"]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True))
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            _stop(p)
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"machine {rank}:\n{text[-3000:]}"
    # Each machine's command returns the one run's summary (the other machine read what rank 0 wrote).
    summaries = [json.loads(text[text.index("\n{\n"):]) for text in outputs]
    assert summaries[0] == summaries[1] and summaries[0]["steps"] == 2
    # Two processes in one group: each step saw 2 processes × 2 pairs; rank 0 logged it once.
    assert [(r["step"], r["samples_seen"]) for r in metrics(out)] == [(1, 4), (2, 8)]
    assert "2 process(es) × 2 pairs × 1 accumulation = 4 pairs/step" in (out / "train.log").read_text()
    assert (out / "train-machine1.log").exists()  # each machine's launcher output in a file of its own
    # The checkpoint holds the random state of both processes, the weights once (rank 0 saved them).
    ckpt = out / "checkpoint-2"  # the last step's (keep 1)
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    lora = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    ups = [t for k, t in lora.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(t.abs().max() > 0 for t in ups)  # LoRA's up-projections start at zero: training moved them
    assert not list(Path(out).glob("*.tmp*"))


@pytest.mark.parametrize("processes, cpus, preset, threads", [(2, 8, None, "4"), (3, 2, None, "1"), (3, None, None, "1"),
                                                               (2, 8, "3", "3"), (1, 8, None, None)])
def test_trainers_on_one_machine_share_its_cores(tiny_models, pairs_file, tmp_path, monkeypatch,  # noqa: F811
                                                 processes, cpus, preset, threads):
    # each trainer's torch would start a thread per core: N of them on one machine oversubscribe it N times
    import richpref.training.launcher as launcher

    started = []

    def spawn(cmd, *, name, env, log_path):
        started.append(env)
        raise RuntimeError("not started")

    monkeypatch.setattr(launcher, "spawn_owned", spawn)
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: cpus)
    env = {} if preset is None else {"OMP_NUM_THREADS": preset}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(RuntimeError, match="not started"):
        launcher.launch_training(tiny_config(tiny_models, pairs_file), tmp_path / "run", num_processes=processes, env=env)
    assert started[0].get("OMP_NUM_THREADS") == threads
