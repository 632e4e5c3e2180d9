"""A finetune output folder: checkpoints (atomic, pruned), the LoRA-only checkpoint hooks, the final
weights with their finetune.json, and whether a config is already trained there."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import yaml

from ..schemas.common import setting_changes
from ..schemas.training import FinetuneConfig, finetune_config_hash, learning_settings
from .models import FINETUNE_META, save_tuned

log = logging.getLogger("richpref")

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "finetune-config.yaml"  # the config of the folder's latest launch, as its trainers read it
LORA_CHECKPOINT = "unet_lora.safetensors"


class TrainingError(RuntimeError):
    pass


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place, trainer state inside), oldest first."""
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = CHECKPOINT.match(p.name)
            if m and (p / TRAINER_STATE).exists():
                found.append((int(m.group(1)), p))
    return sorted(found)


class OtherConfig(ValueError):
    """An output folder whose checkpoints another config made: resuming would mix the two runs."""


DATA_KEY_VERSION = "2-"  # keys without it were made of the footers alone (kept folders are compared so)


def data_key(cfg: FinetuneConfig, footers_only: bool = False) -> str:
    """What a config trains on and from, by content: each pair source's Parquet footers (rows, row groups,
    column statistics) and the bytes of the columns training reads, images and masks aside (captions,
    labels), so pairs curated again at the same path, relabelled, or a file replaced, make another key,
    and a copy or a move of the same files keeps it; a `datasets` source by its name; the `init_from`
    weights' bytes. `footers_only`: the key of earlier versions, which missed a label flipped or a word
    for one as long."""
    from concurrent.futures import ThreadPoolExecutor

    from ..models.runtime import resolve_model_ref
    from ..models.tuned import TunedWeightsError, tuned_fingerprint
    from ..sources.parquet import ParquetPart, footer
    from .data import MASK_COLUMN, PAIR_COLUMNS, pair_files

    def digest(path: str) -> list:
        part = ParquetPart(path)  # its version asked once (a request on an object store)
        meta = footer(path, part.version()).to_dict()
        out = [os.path.basename(path), hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()]
        if not footers_only:  # the columns training reads: not the provenance (critiques: large, unread)
            read = [c for c in (*PAIR_COLUMNS, MASK_COLUMN) if c in part.columns()]
            out.append(part.fingerprint(0, part.num_rows(), read))
        return out

    parts = []
    for src in cfg.data:
        if src.path is None:
            parts.append(src.model_dump(mode="json", exclude={"name", "weight"}))
            continue
        with ThreadPoolExecutor(8) as pool:  # a request each on an object store
            parts.append(list(pool.map(digest, pair_files(src.path))))
    if cfg.init_from:  # the weights it starts from: trained again at the same path, another start
        path = resolve_model_ref(cfg.init_from, cfg.models_root)
        try:
            parts.append(tuned_fingerprint(path))
        except TunedWeightsError:  # no weights there: the preflight refuses it, naming why
            parts.append(path)
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    return key if footers_only else DATA_KEY_VERSION + key


def same_data(recorded: str | None, now: str, cfg: FinetuneConfig) -> bool:
    """Whether a recorded data key names the config's data now (None: recorded before data keys; a key
    of an earlier version is compared with the key that version makes)."""
    if recorded is None or recorded == now:
        return True
    return not recorded.startswith(DATA_KEY_VERSION) and recorded == data_key(cfg, footers_only=True)


def _other_data(where: Path, recorded: str | None, now: str, cfg: FinetuneConfig) -> None:
    """OtherConfig when `where` was trained on other pairs or from other init_from weights than the
    config's now (a record without a data key, from before it was kept, is taken as the same)."""
    if not same_data(recorded, now, cfg):
        raise OtherConfig(f"{where} was trained on other pairs, or from other init_from weights, than the config's "
                          f"now (data key {recorded}, now {now}: pairs curated again, files replaced, init_from trained "
                          "again): give a new --output-dir to train on them, or delete its checkpoint-* folders and "
                          "final/ to train there from scratch")


def _changed_settings(output_dir: Path, cfg: FinetuneConfig, recorded_hash: str | None) -> str:
    """'; changed: loss_mask: none → edit_region, ...' between the config that made the folder's
    checkpoints (its written config, when that is the one) and `cfg`; '' where that config is unknown."""
    try:
        made = FinetuneConfig.model_validate(yaml.safe_load((output_dir / CONFIG_FILE).read_text()))
    except (OSError, ValueError, yaml.YAMLError):  # none written, or one this richpref cannot read
        return ""
    if finetune_config_hash(made) != recorded_hash:
        return ""
    changes = setting_changes(learning_settings(made), learning_settings(cfg))
    return f"; changed: {', '.join(changes)}" if changes else ""


def check_resumable(cfg: FinetuneConfig, output_dir: str | os.PathLike,
                    data: str | None = None) -> tuple[int, Path] | None:
    """The checkpoint a launch on `output_dir` resumes from (None: it starts fresh); OtherConfig when
    another config made it, or when it (or the final weights there) trained on other pairs. The CLI and
    the launcher ask before starting the trainers, the trainer again. `data`: the config's data_key, when
    the caller has it."""
    cfg_hash, data = finetune_config_hash(cfg), data or data_key(cfg)
    existing = checkpoints(Path(output_dir))
    final = Path(output_dir) / "final" / FINETUNE_META
    if not existing:
        if final.exists():
            _other_data(final.parent, json.loads(final.read_text()).get("data_key"), data, cfg)
        return None
    state = json.loads((existing[-1][1] / TRAINER_STATE).read_text())
    if state.get("config_hash") != cfg_hash:
        raise OtherConfig(f"{existing[-1][1]} was made with another config (hash {state.get('config_hash')}, now "
                          f"{cfg_hash}{_changed_settings(Path(output_dir), cfg, state.get('config_hash'))}): give a "
                          "new --output-dir to train with this one, or delete its checkpoint-* folders to start over")
    _other_data(existing[-1][1], state.get("data_key"), data, cfg)
    return existing[-1]


def finished(cfg: FinetuneConfig, output_dir: str | os.PathLike) -> dict | None:
    """The finetune.json of `output_dir` if it holds this config trained to max_train_steps on the same
    pairs, else None."""
    path = Path(output_dir) / "final" / FINETUNE_META
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    if meta.get("config_hash") != finetune_config_hash(cfg) or meta.get("steps", 0) < cfg.max_train_steps:
        return None
    return meta if same_data(meta.get("data_key"), data_key(cfg), cfg) else None


def register_lora_hooks(accelerator, base_unet) -> None:
    """Checkpoints of a LoRA run hold the adapter weights only (safetensors), not the whole UNet."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        for model in models:
            if accelerator.is_main_process:
                state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(
                    accelerator.unwrap_model(model)).items()}
                save_file(state, os.path.join(output_dir, LORA_CHECKPOINT))
            if weights:
                weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, load_file(os.path.join(input_dir, LORA_CHECKPOINT)))
            if getattr(result, "unexpected_keys", None):
                raise TrainingError(f"{input_dir}: LoRA checkpoint has keys the model lacks: {result.unexpected_keys[:5]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, out: Path, step: int, samples_seen: int, cfg_hash: str, keep: int | None,
                    data: str | None = None) -> None:
    """save_state into a temporary folder, then rename it into place and prune the oldest."""
    tmp = out / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": step, "samples_seen": samples_seen, "config_hash": cfg_hash, "data_key": data,
                 "num_processes": accelerator.num_processes, "time": time.time()}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        dest = out / f"checkpoint-{step}"
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        if keep is not None:
            for _, old in checkpoints(out)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved %s", dest)
    accelerator.wait_for_everyone()


def is_sharded(model) -> bool:
    """Whether FSDP (accelerate's FSDP wrapper, or torch's fully_shard) shards `model` over processes."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def full_state_dict(model) -> dict | None:
    """The whole weights of a model sharded by FSDP, on the main process ({} on the others); None for a
    model that is not sharded. Under FSDP every process must call it (it gathers the shards)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def param_norm(model, params) -> float:
    """The L2 norm of `params` (of `model`). Under FSDP each process holds a part of every weight, so the
    squared norms of the local parts are summed over the processes: every process gets the whole
    model's norm (not its own shard's), and every process must call it."""
    import torch
    import torch.distributed as dist

    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    squared = torch.nn.utils.get_total_norm(local).double() ** 2
    if dist.is_available() and dist.is_initialized() and is_sharded(model):
        dist.all_reduce(squared)
    return float(squared.sqrt())


def write_final(unet, out: Path, cfg: FinetuneConfig, cfg_hash: str, arch: str, model_dir: str, step: int,
                last: dict, state_dict: dict | None = None, data: str | None = None) -> dict:
    """final/: the tuned weights (`state_dict`: gathered by full_state_dict from a sharded model) and finetune.json."""
    tmp = out / f"final.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    save_tuned(unet, tmp, cfg, arch, state_dict)
    meta = {"base_model": cfg.model, "base_model_path": model_dir, "arch": arch, "mode": cfg.mode, "steps": step,
            "config_hash": cfg_hash, "data_key": data, "config": cfg.model_dump(mode="json"), "last_metrics": last}
    (tmp / FINETUNE_META).write_text(json.dumps(meta, indent=2))
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("finetune %s: tuned weights in %s", out, final)
    return meta


def load_init_lora(unet, init_from: str, arch: str) -> None:
    """Copy the LoRA at `init_from` into `unet`'s (freshly added, same-shaped) adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    from ..models.tuned import lora_file
    from .models import _pipeline_class

    from .flow_models import FLOW_ARCHS, ArchMismatch, lora_base_check, pipeline_class

    f = lora_file(init_from)
    cls = pipeline_class(arch) if arch in FLOW_ARCHS else _pipeline_class(arch)
    state = cls.lora_state_dict(str(f.parent), weight_name=f.name)
    state = state[0] if isinstance(state, tuple) else state
    lora_base_check(None, state, arch, init_from)
    prefix = "transformer." if arch in FLOW_ARCHS else "unet."
    state = convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    try:
        unfit = getattr(set_peft_model_state_dict(unet, state), "unexpected_keys", None) or []
    except RuntimeError as exc:  # a tensor of another shape: another rank (the preflight checks it first)
        unfit = [str(exc).strip().splitlines()[-1].strip()[:200]]
    if unfit or not state:  # the same on every launch: refused, not relaunched
        raise ArchMismatch(f"init_from {init_from}: its LoRA does not fit this one (rank, target modules, or a "
                           f"LoRA for another base model): {(unfit or ['no ' + prefix[:-1] + ' weights'])[:3]}; "
                           "give a LoRA trained with the same base and lora settings, or drop init_from")


def load_init_unet(unet, init_from: str) -> None:
    """Copy the full UNet at `init_from` into `unet`."""
    from diffusers import UNet2DConditionModel

    from ..models.tuned import unet_dir

    tuned = UNet2DConditionModel.from_pretrained(unet_dir(init_from))
    unet.load_state_dict(tuned.state_dict())
