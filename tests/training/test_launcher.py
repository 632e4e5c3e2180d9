"""Training on several machines: the `accelerate launch` command `richpref finetune --num-machines M
--machine-rank R --main-process-ip HOST` builds, checked against accelerate's own parser, and the
bad inputs it refuses before anything starts; a trainer that stops on bad input is not relaunched."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from richpref.training.launcher import DEFAULT_MAIN_PORT, Machines, accelerate_command
from test_finetune import tiny_config, write_pairs


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
    assert _parsed(accelerate_command("c", "o", 1)).multi_gpu is False


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
    with pytest.raises(LaunchFailed, match="cannot decode image") as err:
        launch_training(cfg, out, max_restarts=2, log_file=str(tmp_path / "train.log"))
    assert "not relaunched" in str(err.value)
    assert (tmp_path / "train.log").read_text().count("Traceback") <= 1  # one launch, not three
