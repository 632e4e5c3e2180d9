"""Start a training run under `accelerate launch`, and start it again after a crash.

The effective config is written to OUTPUT/finetune-config.yaml (provenance, and what every process
reads). Training resumes from the latest checkpoint on its own, so "retry" is just "launch again".
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from filelock import FileLock, Timeout

from richpref.common.procs import free_port, spawn_owned, stop_owned
from richpref.common.atomic import write_atomic
from ..schemas.training import FinetuneConfig
from .checkpoints import CONFIG_FILE
from .models import REFUSED_INPUT, read_meta

log = logging.getLogger("richpref")



class LaunchFailed(RuntimeError):
    pass


MACHINES_ENV = ("RICHPREF_NUM_MACHINES", "RICHPREF_MACHINE_RANK", "RICHPREF_MAIN_PROCESS_IP", "RICHPREF_MAIN_PROCESS_PORT")
DEFAULT_MAIN_PORT = 29500  # every machine must name the same port: no free-port pick across machines


@dataclass(frozen=True)
class Machines:
    """Where this machine stands in a multi-machine run: `num_machines` machines, each running
    `num_processes` processes (one per GPU), rank 0's `main_process_ip`:`main_process_port` the
    rendezvous every machine connects to."""

    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None

    def __post_init__(self) -> None:
        if self.num_machines < 1:
            raise ValueError(f"--num-machines must be >= 1, got {self.num_machines}")
        if not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(f"--machine-rank {self.machine_rank} is outside 0..{self.num_machines - 1} "
                             f"(--num-machines {self.num_machines}); give each machine its own rank, 0 on the main one")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError(f"--num-machines {self.num_machines} needs --main-process-ip: the address of the "
                             "machine with --machine-rank 0, reachable from every machine")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Machines":
        """From RICHPREF_NUM_MACHINES, RICHPREF_MACHINE_RANK, RICHPREF_MAIN_PROCESS_IP and
        RICHPREF_MAIN_PROCESS_PORT (set by `richpref finetune --num-machines ...`, or in the environment
        of each machine's Prefect worker)."""
        env = os.environ if env is None else env
        n, rank, ip, port = (env.get(k) for k in MACHINES_ENV)
        return cls(int(n or 1), int(rank or 0), ip or None, int(port) if port else None)

    def log_name(self) -> str:
        """This machine's launcher log in the shared output folder: train.log on the main machine,
        train-machine<R>.log on the others (one file each, not interleaved appends)."""
        return "train.log" if self.machine_rank == 0 else f"train-machine{self.machine_rank}.log"

    def to_env(self) -> dict[str, str]:
        values = (self.num_machines, self.machine_rank, self.main_process_ip or "", self.main_process_port or "")
        return {k: str(v) for k, v in zip(MACHINES_ENV, values)}


def write_config(cfg: FinetuneConfig, output_dir: str | os.PathLike) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    write_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())
    return path


def accelerate_command(config_path: str | os.PathLike, output_dir: str | os.PathLike, num_processes: int = 1,
                       mixed_precision: str = "no", fsdp: bool = False, machines: Machines | None = None) -> list[str]:
    """`accelerate launch` running `python -m richpref.training.train` on `num_processes` processes
    on this machine (× `machines.num_machines` in all: accelerate counts processes over all machines).

    More than one process goes through torchrun (accelerate's --multi_gpu path); the training script
    then picks NCCL on GPUs and gloo on CPU-only machines. On several machines, every machine runs this
    command with its own `machine_rank` and the same rendezvous address.
    """
    m = machines or Machines()
    total = num_processes * m.num_machines
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", str(m.num_machines),
           "--num_processes", str(total), "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if fsdp:  # full sharding, transformer blocks wrapped, as accelerate's FSDP defaults for diffusers models
        cmd += ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_auto_wrap_policy",
                "TRANSFORMER_BASED_WRAP"]
    if m.num_machines > 1:  # every machine names the same rendezvous port
        cmd += ([] if fsdp else ["--multi_gpu"]) + [
            "--machine_rank", str(m.machine_rank), "--main_process_ip", m.main_process_ip,
            "--main_process_port", str(m.main_process_port or DEFAULT_MAIN_PORT)]
    elif fsdp or num_processes > 1:
        cmd += ([] if fsdp else ["--multi_gpu"]) + ["--main_process_port", str(free_port())]
    return cmd + ["-m", "richpref.training.train", "--config", str(config_path), "--output-dir", str(output_dir)]


FSDP_NEEDS_GPUS = ("accelerate shards a model with FSDP on GPUs only: on a machine without CUDA its "
                   "FullyShardedDataParallelPlugin refuses to start (\"FSDP parameter initialization with "
                   "`sync_module_states=True` is not supported on cpu\"), and without that option AcceleratorState "
                   "turns FSDP on only for GPU-like devices, so the processes run MULTI_CPU data parallelism with an "
                   "unsharded copy each")


def check_fsdp_device(cfg: FinetuneConfig) -> None:
    """Refuse `fsdp: true` where accelerate cannot shard (no CUDA device), before any process starts."""
    import torch

    if cfg.fsdp and not torch.cuda.is_available():
        raise ValueError(f"finetune {cfg.name}: fsdp: true, but this machine has no CUDA device; {FSDP_NEEDS_GPUS}. "
                         "Launch it on GPUs, or use mode: lora (the reference is then the same transformer with "
                         "adapters off) with fsdp: false")


def launch_training(cfg: FinetuneConfig, output_dir: str | os.PathLike, *, num_processes: int = 1,
                    max_restarts: int = 0, env: dict[str, str] | None = None, log_file: str | None = None,
                    on_poll: Callable[[], None] | None = None, poll_seconds: float = 10.0,
                    machines: Machines | None = None) -> dict:
    """Run training to the end, relaunching up to `max_restarts` times after a crash; return finetune.json.

    `on_poll` is called every `poll_seconds` while training runs (progress reports). `machines`
    (default: from RICHPREF_NUM_MACHINES etc., see Machines.from_env) spreads it over several
    machines; their output_dir must then be one shared folder."""
    from .checkpoints import check_resumable, finished

    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    done = finished(cfg, output_dir)
    if done is not None:  # no processes to start for a run that is complete
        log.info("finetune %s: already trained to step %d", output_dir, done["steps"])
        return read_meta(output_dir)
    check_fsdp_device(cfg)
    run_env = {**os.environ, **(env or {})}
    machines = machines or Machines.from_env(run_env)
    # Two launches on one output folder would resume from each other's checkpoints and overwrite them:
    # one holds it (per machine rank: the machines of one run share the folder) until its trainers end.
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    lock = FileLock(Path(output_dir) / f".launch-rank{machines.machine_rank}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LaunchFailed(f"{output_dir} is being trained by another launch on this machine (rank "
                           f"{machines.machine_rank}); wait for it to end, or give another --output-dir") from None
    try:
        check_resumable(cfg, output_dir)  # OtherConfig: before any trainer starts
        return _launch(cfg, output_dir, num_processes, max_restarts, run_env, log_file, on_poll, poll_seconds, machines)
    finally:
        lock.release()


def _launch(cfg: FinetuneConfig, output_dir: str | os.PathLike, num_processes: int, max_restarts: int,
            run_env: dict[str, str], log_file: str | None, on_poll: Callable[[], None] | None, poll_seconds: float,
            machines: Machines) -> dict:
    config_path = write_config(cfg, output_dir)
    if cfg.models_root:  # the trainers read the written config; the environment must not send them elsewhere
        run_env["RICHPREF_MODELS_ROOT"] = cfg.models_root
    if num_processes > 1 and "OMP_NUM_THREADS" not in run_env:
        run_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_processes))
    refused = Path(output_dir) / REFUSED_INPUT
    refused.unlink(missing_ok=True)  # left by an earlier launch on input that has been fixed since
    codes = []
    for attempt in range(max_restarts + 1):
        cmd = accelerate_command(config_path, output_dir, num_processes, cfg.mixed_precision, cfg.fsdp, machines)
        log.info("launch %d/%d: %s", attempt + 1, max_restarts + 1, " ".join(cmd))
        # The trainers die with this process (richpref.common.procs), also when it is SIGKILLed.
        proc = spawn_owned(cmd, name="accelerate-train", env=run_env, log_path=log_file)
        try:
            while True:
                try:
                    code = proc.wait(timeout=poll_seconds)
                    break
                except subprocess.TimeoutExpired:
                    if on_poll:
                        on_poll()
        finally:  # interrupted (Ctrl-C, flow cancelled) or done: no trainer is left behind
            stop_owned(proc)
        codes.append(code)
        if code == 0:
            return read_meta(output_dir)
        if refused.exists():
            raise LaunchFailed(f"training in {output_dir} stopped on its input: {refused.read_text().strip()}. "
                               "Fix the data and launch again; it resumes from the latest checkpoint "
                               "(not relaunched: the same input would fail the same way).")
        log.warning("training exited with code %d; %s", code,
                    "relaunching: it resumes from the latest checkpoint" if attempt < max_restarts else "giving up")
    raise LaunchFailed(
        f"training in {output_dir} failed {len(codes)} time(s) (exit codes {codes}); see "
        f"{log_file or 'the output above'}. Launch again to resume from the latest checkpoint."
    )
