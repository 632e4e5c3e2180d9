"""Offline checks of a diffusers pipeline folder, for `richpref doctor` (nothing is loaded).

From model_index.json alone: the pipeline class and its model family (models/families.py), the
denoiser's class, and every component the loader will open: its folder, its config, its weight files
(every shard a `*.index.json` names). The weight files counted for memory are the components' own, so
the single-file checkpoints some Hub repos keep beside the diffusers folders (FLUX.1-dev's
flux1-dev.safetensors, SD3.5's sd3.5_medium.safetensors) are not counted twice.
"""
from __future__ import annotations

import json
from pathlib import Path

from richpref.models.families import DENOISERS, UnknownPipeline, detect_checkpoint_family

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".onnx")
# The weight file each library writes for a model component (save_pretrained).
_WEIGHT_NAME = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


class PipelineProblem(ValueError):
    """What is wrong with a pipeline folder (`cause`) and what to do about it (`fix`)."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(cause)
        self.cause, self.fix = cause, fix


def components(path: str | Path) -> dict[str, tuple[str, str]]:
    """component -> (library, class) of a pipeline folder's model_index.json ({} when there is none)."""
    index = Path(path) / "model_index.json"
    if not index.exists():
        return {}
    data = json.loads(index.read_text(encoding="utf-8"))
    return {k: (v[0], v[1]) for k, v in data.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] and v[1]}


def _is_model(cls: str, name: str) -> bool:
    """A component with weights (not a scheduler, tokenizer or processor)."""
    light = ("Scheduler", "Tokenizer", "Processor", "FeatureExtractor")
    return not (cls.endswith(light) or "Tokenizer" in cls or name.startswith(("tokenizer", "processor", "scheduler")))


def _config_class(folder: Path) -> str | None:
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]


def _missing_shards(folder: Path) -> list[str]:
    missing = []
    for index in folder.glob("*.index.json"):
        names = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing += sorted(n for n in names if not (folder / n).exists())
    return missing


def check_pipeline_files(path: str | Path) -> None:
    """Every component model_index.json lists is there with its config and weights; else PipelineProblem
    naming the missing file."""
    root = Path(path)
    fix = ("download the missing files again (`huggingface-cli download <repo>`, the whole repo, not only some "
           "folders) or rebuild the folder; for the tiny models run `richpref models build-tiny <models_root>`")
    for name, (library, cls) in components(root).items():
        folder = root / name
        if not folder.is_dir():
            raise PipelineProblem(f"{root}/model_index.json lists {name} ({cls}) but {folder}/ is missing", fix)
        if not _is_model(cls, name):
            if not any(folder.iterdir()):
                raise PipelineProblem(f"{folder}/ ({cls}) is empty", fix)
            continue
        if not (folder / "config.json").exists():
            raise PipelineProblem(f"{folder}/config.json ({cls}) is missing", fix)
        shards = _missing_shards(folder)
        if shards:
            raise PipelineProblem(f"{folder}: weight shard(s) {', '.join(shards)} listed in its index are missing", fix)
        if not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in folder.iterdir() if f.is_file()):
            expected = _WEIGHT_NAME.get(library, "*.safetensors")
            raise PipelineProblem(f"{folder}/{expected} ({cls} weights) is missing: {folder} has no weight file", fix)


def check_text_to_image(path: str | Path, field: str = "sample.model") -> str:
    """The family of a text-to-image pipeline folder, after checking its class, its denoiser's class and
    its files; PipelineProblem otherwise."""
    root = Path(path)
    try:
        family = detect_checkpoint_family(root)
    except FileNotFoundError as exc:
        raise PipelineProblem(str(exc), f"point {field} at a diffusers pipeline folder (model_index.json)") from None
    except UnknownPipeline as exc:
        raise PipelineProblem(str(exc), f"point {field} at a text-to-image checkpoint richpref generates with") from None
    folder, want = DENOISERS[family]
    got = components(root).get(folder, (None, None))[1]
    if got != want:
        raise PipelineProblem(f"{root}: a {family} pipeline needs a {folder} of class {want}, model_index.json names "
                              f"{got or 'none'}", f"point {field} at a complete {family} checkpoint")
    check_pipeline_files(root)
    if (root / folder / "config.json").exists() and _config_class(root / folder) not in (want, None):
        raise PipelineProblem(f"{root}/{folder}/config.json is a {_config_class(root / folder)}, not a {want}",
                              f"point {field} at a complete {family} checkpoint")
    return family
