"""What `richpref doctor` checks before anything loads: every model reference of a profile resolves,
is in a format the loaders read, and fits in the memory of the device it will run on.

Each failure is a `ModelProblem` naming the stage, the model, the cause and the fix, found in
seconds (no model is loaded, no Hub request is made while HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from richpref.doctor.pipelines import PipelineProblem, check_pipeline_files, check_text_to_image, components
from richpref.models.families import check_sequence_length, detect_checkpoint_family
from richpref.models.runtime import ModelNotAvailable, device_problem, resolve_device, resolve_model_ref
from richpref.schemas.config import Profile, ProfileError

# Bytes per element of each safetensors dtype; floating ones are cast to the stage's dtype at load.
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT = {"F64", "F32", "F16", "BF16"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".onnx")
NATIVE_LLAVA = "LlavaQwenForCausalLM"
_VARIANT_TAGS = ("fp16", "bf16", "ema", "non_ema")


class DoctorError(RuntimeError):
    """Why the doctor stopped; the message is what the user reads."""

    exit_code = 1


@dataclass
class ModelProblem(DoctorError):
    stage: str
    model: str
    cause: str
    fix: str
    kind: str = "unavailable"  # unavailable | native_llava | memory | missing_package | load_failed

    exit_code = 3

    def __str__(self) -> str:
        return f"{self.stage}: model {self.model!r} cannot be loaded\n  cause: {self.cause}\n  fix: {self.fix}"


@dataclass
class ModelRef:
    """One model a stage loads: the profile's reference, what it resolved to, where it will run."""

    stage: str
    field: str  # the profile key, e.g. "edit.controlnet" or "score.rewards.clip.model"
    ref: str
    kind: str  # diffusers | vlm | rembg | reward | annotator
    path: str | None = None  # local directory or file, once resolved
    file: str | None = None  # a checkpoint file a resolved directory must hold (a reward's `file:`)
    device: str = "cpu"
    dtype: str = "auto"

    def describe(self) -> str:
        return self.ref if self.path in (None, self.ref) else f"{self.ref} ({self.path})"


def model_refs(profile: Profile) -> list[ModelRef]:
    """Every model the profile's stages load, in pipeline order: what each stage declares (`Stage.models`)."""
    from richpref.tasks import stages_for

    return [ModelRef(stage.name, use.field, use.ref, use.kind, file=use.file, device=local_device(stage.section, use.cfg.device),
                     dtype=use.cfg.dtype)
            for stage in stages_for(profile) if stage.models is not None for use in stage.models(profile)
            if use.ref and not _served_elsewhere(use)]


def local_device(section: str, name: str) -> str:
    """The device a section's models load on, on this machine; ProfileError naming the setting and the
    fix when it has no such device (a curate on a cluster checks on its workers instead)."""
    missing = device_problem(name)
    if missing:
        raise ProfileError(f"{section}.device {name!r}: {missing}; set {section}.device to auto or cpu (doctor: "
                           "--device cpu), or run on a machine that has it")
    return str(resolve_device(name))


def _served_elsewhere(use) -> bool:
    """A model a running server serves (its section's `engine.endpoint`): its weights live there, so
    it is neither found nor fitted here."""
    engine = getattr(use.cfg, "engine", None)
    return engine is not None and engine.weights_elsewhere


def resolve_models(profile: Profile, stages: set[str] | None = None) -> None:
    """Resolve every model the profile's `stages` (None: all) load, reading no weights and importing no
    model library: a model that is not there raises ModelProblem (the stage, the model, the cause, the fix)."""
    for ref in model_refs(profile):
        if stages is None or ref.stage in stages:
            resolve(ref, profile)


def check_key_inputs(profile: Profile, stages) -> None:
    """What each stage's key reads besides its section (prompt templates, tuned weights) is there: a
    missing one is refused before Prefect starts, not when its stage is reached after the ones before it."""
    for stage in stages:
        try:
            stage.key_extra(profile)
        except (ValueError, OSError) as exc:
            raise ProfileError(f"{stage.section}: {exc}") from None


def _cutout_check(ref: ModelRef, profile: Profile) -> None:
    from richpref.models import cutout as rembg_models
    from richpref.tasks.cutout import _under_root

    cfg = profile.cutout
    home = _under_root(cfg.home, profile.models_root)
    if home is not None:
        os.environ["U2NET_HOME"] = home  # what BackgroundRemover.load sets before opening the session
    if ref.ref in rembg_models.CUSTOM_MODELS:
        path = rembg_models._resolve_custom_path(ref.ref, _under_root(cfg.model_path, profile.models_root), home)
        ref.path = str(path)
        return
    expected = rembg_models.expected_model_path(ref.ref)
    if expected is None:  # a session this module has no file for: rembg must know its name (importing it, ~1 s)
        from richpref.models.rembg_import import sessions_names

        if ref.ref not in sessions_names:
            raise ModelProblem(ref.stage, ref.ref, f"{ref.ref!r} is no rembg session; this rembg has "
                               f"{', '.join(sorted(sessions_names))}", f"set {ref.field} to one of those sessions "
                               "(u2net is the default), or u2net_custom with cutout.model_path for an .onnx of your own")
    else:
        ref.path = str(expected)
        if not expected.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelNotAvailable(rembg_models._missing_model_message(ref.ref, expected))


def check_tuned_base(profile: Profile, family: str) -> None:
    """sample.lora / sample.unet, when a finetune output, trained on the family sample.model is."""
    from richpref.models.tuned import tuned_elsewhere

    for key in ("lora", "unet"):
        path = getattr(profile.sample, key)
        why = tuned_elsewhere(path, family) if path else None
        if why:
            raise ProfileError(f"sample.{key} {why} (sample.model {profile.sample.model!r}): give weights tuned from "
                               "this model, or sample with the model they were tuned from")


def is_native_llava(path: str) -> bool:
    config = Path(path) / "config.json"
    try:
        return NATIVE_LLAVA in (json.loads(config.read_text(encoding="utf-8")).get("architectures") or [])
    except (OSError, ValueError):
        return False


def resolve(ref: ModelRef, profile: Profile) -> ModelRef:
    """Resolve one reference, or raise ModelProblem saying what is wrong and how to fix it."""
    try:
        if ref.kind == "rembg":
            _cutout_check(ref, profile)
        else:
            ref.path = resolve_model_ref(ref.ref, profile.models_root)
    except ModelNotAvailable as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hub_id = ref.ref.count("/") == 1 and not ref.ref.startswith((".", "/", "~"))
        if ref.kind == "rembg":
            fix = f"run `rembg d {ref.ref}` on a connected machine and copy the file into the rembg home"
        elif offline and hub_id:
            fix = (f"download it on a connected machine: `huggingface-cli download {ref.ref}` (then copy the "
                   f"Hugging Face cache here), or point {ref.field} at a local directory")
        else:
            fix = (f"point {ref.field} at an existing directory or a Hub id 'owner/name'; for the tiny profile run "
                   "`richpref models build-tiny <models_root>`")
        raise ModelProblem(ref.stage, ref.ref, str(exc), fix) from None
    if ref.file and ref.path and Path(ref.path).is_dir() and not (Path(ref.path) / ref.file).is_file():
        hub = f"huggingface-cli download <its Hub repo> {ref.file} --local-dir {ref.path}"
        raise ModelProblem(ref.stage, ref.ref, f"{ref.path} holds no reward checkpoint {ref.file!r}",
                           f"put it there ({hub}) or set {ref.field.rsplit('.', 1)[0]}.file to the checkpoint's name")
    if ref.kind == "diffusers" and ref.path and (Path(ref.path) / "model_index.json").exists():
        try:  # classes and files of the pipeline folder (sample: also a family richpref generates with)
            if ref.field == "sample.model":
                check_text_to_image(ref.path, ref.field)
            else:
                check_pipeline_files(ref.path)
        except PipelineProblem as exc:
            raise ModelProblem(ref.stage, ref.ref, exc.cause, exc.fix, kind="load_failed") from None
        if ref.field == "sample.model":  # the sampler refuses these only once the model has loaded
            family = detect_checkpoint_family(ref.path)
            try:
                check_sequence_length(family, profile.sample.max_sequence_length, "sample.max_sequence_length")
            except ValueError as exc:
                raise ProfileError(f"{exc} (sample.model {ref.ref!r})") from None
            check_tuned_base(profile, family)
    variant = getattr(getattr(profile, section_of(ref.stage)), "variant", None)
    if ref.kind == "diffusers" and variant and ref.path and Path(ref.path).is_dir() \
            and not any(f".{variant}." in f.name for f in Path(ref.path).rglob("*")):
        raise ModelProblem(ref.stage, ref.ref, f"{ref.path} has no {variant!r} weight files (*.{variant}.safetensors)",
                           f"unset {ref.stage}.variant to load the plain weights (--set {ref.stage}.variant=null)",
                           kind="load_failed")
    if ref.kind == "vlm" and ref.path and is_native_llava(ref.path):
        raise ModelProblem(
            ref.stage, ref.ref,
            f"{ref.path} is a LLaVA-NeXT native checkpoint ({NATIVE_LLAVA}), which transformers cannot load",
            f"convert it once: `richpref models convert-llava-critic {ref.path} {ref.path.rstrip('/')}-hf`, "
            f"then set {ref.field}={ref.path.rstrip('/')}-hf",
            kind="native_llava",
        )
    return ref


# --- memory ---------------------------------------------------------------------------------------


def _safetensors_bytes(path: Path, itemsize: int | None) -> int:
    """Parameter bytes of a .safetensors file once floats are cast to `itemsize` (None: as stored)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for d in t["shape"]:
            numel *= d
        stored = _SAFETENSORS_BYTES.get(t["dtype"], 4)
        total += numel * (itemsize if itemsize and t["dtype"] in _FLOAT else stored)
    return total


def weight_files(path: str, variant: str | None = None) -> list[Path]:
    """The weight files a loader would read from `path` (a file or a directory tree).

    Where a directory holds both a plain and a variant copy (`x.safetensors`, `x.fp16.safetensors`),
    only one counts: the variant when asked for, else the plain one; safetensors win over .bin. In a
    pipeline folder only the components model_index.json lists count.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    parts_of_pipeline = components(p)
    if parts_of_pipeline:
        return [f for name in parts_of_pipeline for f in weight_files(str(p / name), variant)]
    groups: dict[tuple[Path, str], list[tuple[bool, Path]]] = {}
    for f in sorted(p.rglob("*")):
        if not (f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)):
            continue
        parts = f.name.split(".")
        tag = parts[-2] if len(parts) > 2 and parts[-2] in _VARIANT_TAGS else None
        stem = ".".join(parts[:-2] if tag else parts[:-1]).replace("diffusion_pytorch_model", "model")
        preferred = (tag == variant) if tag else (variant is None)
        groups.setdefault((f.parent, stem.replace("pytorch_model", "model")), []).append((preferred, f))
    chosen = []
    for candidates in groups.values():
        wanted = [f for ok, f in candidates if ok] or [f for _, f in candidates]
        chosen.append(next((f for f in wanted if f.suffix == ".safetensors"), wanted[0]))
    return chosen


def dtype_itemsize(dtype: str, device: str) -> int | None:
    if dtype in ("float16", "bfloat16"):
        return 2
    if dtype == "float32":
        return 4
    return 2 if device.startswith("cuda") else 4  # "auto": half precision on GPUs, float32 on CPUs


def weights_bytes(path: str | None, dtype: str = "auto", device: str = "cpu", variant: str | None = None) -> int:
    """Bytes the model's weights take in memory at `dtype` (0 when nothing local is known)."""
    if not path:
        return 0
    itemsize = dtype_itemsize(dtype, device)
    total = 0
    for f in weight_files(path, variant):
        total += _safetensors_bytes(f, itemsize) if f.suffix == ".safetensors" else f.stat().st_size
    return total


def available_bytes(device: str) -> int:
    """Free memory where the model will live: the GPU's free memory, else the machine's available RAM."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        free, _ = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def section_of(stage: str) -> str:
    """The profile section that configures a stage (the rebuild's rewards stage and relabel-dataset's
    pickapic_score run score's models)."""
    from richpref.tasks import REBUILD, RELABEL_DATASET, STAGES

    stages = {**STAGES, **{s.name: s for s in (*REBUILD, *RELABEL_DATASET)}}
    return stages[stage].section if stage in stages else stage


def _half_dtype(section: str, profile: Profile) -> str:
    """bfloat16 for the VLMs and the flow-matching transformers (FLUX.1 overflows in float16), else float16."""
    if section in ("critique", "instruct", "check"):
        return "bfloat16"
    if section == "edit" and profile.edit.kind in ("flux_kontext", "qwen_image_edit"):
        return "bfloat16"
    if section == "sample":
        from richpref.models.families import FLOW_FAMILIES, detect_checkpoint_family

        try:
            if detect_checkpoint_family(resolve_model_ref(profile.sample.model, profile.models_root)) in FLOW_FAMILIES:
                return "bfloat16"
        except (OSError, ValueError, ModelNotAvailable):  # not a local pipeline folder: the UNet default
            pass
    return "float16"


def memory_fix(stage: str, profile: Profile) -> str:
    section = section_of(stage)
    cfg = getattr(profile, section)
    half = _half_dtype(section, profile)
    return (f"load it in half precision (--set {section}.dtype={half}; now {cfg.dtype}) and/or lower "
            f"{section}.batch_size (now {cfg.batch_size}); or run the stage on a device with more memory "
            f"({section}.device, now {cfg.device})")


def check_memory(refs: list[ModelRef], profile: Profile) -> dict[str, int]:
    """Weight bytes per stage; ModelProblem when one stage's weights alone exceed the free memory."""
    per_stage: dict[str, int] = {}
    device_of: dict[str, str] = {}
    for ref in refs:
        variant = getattr(getattr(profile, section_of(ref.stage)), "variant", None)
        per_stage[ref.stage] = per_stage.get(ref.stage, 0) + weights_bytes(ref.path, ref.dtype, ref.device, variant)
        device_of[ref.stage] = ref.device
    for stage, need in per_stage.items():
        have = available_bytes(device_of[stage])
        if need > have:
            models = ", ".join(r.ref for r in refs if r.stage == stage)
            raise ModelProblem(stage, models, f"its weights need {need / 2**30:.1f} GiB at dtype "
                               f"{getattr(profile, section_of(stage)).dtype} but {device_of[stage]} has {have / 2**30:.1f} GiB free",
                               memory_fix(stage, profile), kind="memory")
    return per_stage


def preflight(profile: Profile) -> tuple[list[ModelRef], dict[str, int]]:
    """Resolve and size every model of the profile; the first problem raises ModelProblem (a prompt template
    or tuned weights that are not there: ProfileError)."""
    from richpref.tasks import stages_for

    check_key_inputs(profile, stages_for(profile))
    refs = [resolve(r, profile) for r in model_refs(profile)]
    return refs, check_memory(refs, profile)
