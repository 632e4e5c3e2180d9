"""sample: prompts -> images, generated with diffusers (seeded per item) or taken from the dataset."""
from __future__ import annotations

import pyarrow as pa

from richpref.common.images import BadImage, decode_image, encode_png, flat_reason
from ..models.runtime import resident, resolve_model_ref
from ..models.tuned import weights_fingerprint
from richpref.common.overlap import chunks, pipelined
from ..schemas.config import Profile, SampleConfig
from ..schemas.tables import SAMPLES, rows_to_table
from .base import ModelUse, Stage, StageInputs, item_seed, kept, rejected


def load_generator(cfg: SampleConfig, models_root: str | None):
    from ..models.generator import TextToImage
    from ..models.tuned import apply_tuned

    path = resolve_model_ref(cfg.model, models_root)
    extra = dict(variant=cfg.variant, compile=cfg.compile, channels_last=cfg.channels_last)
    checker = {"safety_checker": True} if cfg.safety_checker else {}

    def load():
        from ..models.generator import apply_pipeline_settings

        t2i = TextToImage.load(path, device=cfg.device, dtype=cfg.dtype, scheduler=cfg.scheduler,
                               **{**extra, "compile": False}, **checker)
        apply_tuned(t2i, lora=cfg.lora, unet=cfg.unet)
        if cfg.compile:  # after the tuned weights are in: compile the denoiser that will run
            apply_pipeline_settings(t2i.pipe, compile=True)
        return t2i

    # The key of a plain config stays what it was before these settings existed.
    key = ("generator", path, cfg.scheduler, cfg.device, cfg.dtype) + (tuple(extra.values()) if any(extra.values()) else ())
    key += tuple(checker.items())
    tuned = weights_fingerprint(cfg.lora, cfg.unet) if (cfg.lora or cfg.unet) else None
    return resident.get(key + ((tuned,) if tuned else ()), load)


def sample_rows(rows: pa.Table, cfg: SampleConfig, get_generator) -> pa.Table:
    out: dict[str, dict] = {}
    to_generate = []
    for r in rows.to_pylist():
        iid = r["item_id"]
        if cfg.use_dataset_image and r.get("image") is not None:
            try:
                img = decode_image(r["image"])
            except BadImage as exc:
                out[iid] = rejected(iid, str(exc), prompt=r["prompt"])
                continue
            if flat := flat_reason(img, cfg.min_image_std):
                out[iid] = rejected(iid, flat, prompt=r["prompt"])
                continue
            out[iid] = kept(iid, prompt=r["prompt"], image=r["image"], width=img.width, height=img.height,
                            seed=None, origin="dataset", model_id=None)
        else:
            to_generate.append(r)
    if to_generate:
        gen = get_generator()

        def run(batch):  # one pipeline call per batch, as generate(batch_size=cfg.batch_size) would make
            return gen.generate([r["prompt"] for r in batch], [item_seed(cfg.seed, r["item_id"]) for r in batch],
                                steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=cfg.height,
                                width=cfg.width, batch_size=len(batch), max_sequence_length=cfg.max_sequence_length)

        def finish(batch, _, images):  # PNG encoding overlaps the next batch's generation
            return [rejected(r["item_id"], flat, prompt=r["prompt"]) if (flat := flat_reason(img, cfg.min_image_std))
                    else kept(r["item_id"], prompt=r["prompt"], image=encode_png(img), width=img.width, height=img.height,
                              seed=item_seed(cfg.seed, r["item_id"]), origin="generated", model_id=gen.model_id)
                    for r, img in zip(batch, images)]

        for done in pipelined(chunks(to_generate, cfg.batch_size), run, finish=finish):
            out.update((row["item_id"], row) for row in done)
    return rows_to_table([out[i] for i in rows.column("item_id").to_pylist()], SAMPLES)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.sample
    return sample_rows(inputs.rows, cfg, lambda: load_generator(cfg, profile.models_root))


def _tuned_key(profile: Profile) -> str:
    """The tuned weights' content (not only their path: new weights at the same path are a new key)."""
    return weights_fingerprint(profile.sample.lora, profile.sample.unet)


def uses_model(profile: Profile) -> bool:
    """False when every source row brings its own image and sample keeps it."""
    src = profile.source
    return not (profile.sample.use_dataset_image and (src.pickapic_preferred or src.image_column))


def models(profile: Profile) -> list[ModelUse]:
    return [ModelUse("sample.model", profile.sample.model, "diffusers", profile.sample)] if uses_model(profile) else []


def load_models(profile: Profile) -> list[str]:
    return [load_generator(profile.sample, profile.models_root).model_id] if uses_model(profile) else []


STAGE = Stage(name="sample", version="2", section="sample", reads=("source",), compute=compute, key_extra=_tuned_key,
              schema=SAMPLES, models=models, load=load_models)
