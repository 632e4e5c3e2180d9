"""samples (rebuild): each prompt -> `sample.num_samples` images, sample k seeded from (seed, item, k).

Sample 0 takes the item's own seed (`item_seed`: the image the edit pipeline's sample stage makes for
the same item), sample k > 0 a seed of its own, so every image is reproducible on its own, whatever
its batch, shard or worker. A flat image (safety checker's black output, blank) is rejected with its
reason; the item's other samples stay.
"""
from __future__ import annotations

import pyarrow as pa

from richpref.common.images import encode_png, flat_reason
from richpref.common.overlap import chunks, pipelined
from ..schemas.config import Profile, SampleConfig
from ..schemas.tables import REBUILD_SAMPLES, rows_to_table
from .base import Stage, StageInputs, item_seed, kept, rejected
from .sample import _tuned_key, load_generator
from .sample import load_models as load_sample_models
from .sample import models as sample_models


def sample_seed(base: int, item_id: str, k: int) -> int:
    """The seed of sample k of an item: the item's seed for sample 0, else one keyed by (item, k)."""
    return item_seed(base, item_id) if k == 0 else item_seed(base, f"{item_id}#{k}")


def num_samples(profile: Profile) -> int:
    return profile.sample.num_samples or 1


def sample_many(rows: pa.Table, cfg: SampleConfig, get_generator) -> pa.Table:
    """`cfg.num_samples` rows per input row (candidate 0..N-1), kept with their image or rejected."""
    n = cfg.num_samples or 1
    todo = [(r["item_id"], r["prompt"], k) for r in rows.select(["item_id", "prompt"]).to_pylist() for k in range(n)]
    if not todo:
        return rows_to_table([], REBUILD_SAMPLES)
    gen = get_generator()

    def run(batch):  # one pipeline call per batch
        return gen.generate([p for _, p, _ in batch], [sample_seed(cfg.seed, i, k) for i, _, k in batch],
                            steps=cfg.steps, guidance_scale=cfg.guidance_scale, height=cfg.height, width=cfg.width,
                            batch_size=len(batch), max_sequence_length=cfg.max_sequence_length)

    def finish(batch, _, images):  # PNG encoding overlaps the next batch's generation
        out = []
        for (iid, prompt, k), img in zip(batch, images):
            seed = sample_seed(cfg.seed, iid, k)
            if flat := flat_reason(img, cfg.min_image_std):
                out.append(rejected(iid, flat, candidate=k, prompt=prompt, seed=seed))
            else:
                out.append(kept(iid, candidate=k, prompt=prompt, image=encode_png(img), width=img.width,
                                height=img.height, seed=seed, origin="generated", model_id=gen.model_id))
        return out

    done: list[dict] = []
    for part in pipelined(chunks(todo, cfg.batch_size), run, finish=finish):
        done += part
    return rows_to_table(done, REBUILD_SAMPLES)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.sample
    return sample_many(inputs.rows, cfg, lambda: load_generator(cfg, profile.models_root))


STAGE = Stage(name="samples", version="1", section="sample", reads=("source",), compute=compute,
              key_extra=_tuned_key, fan_out=num_samples, schema=REBUILD_SAMPLES, models=sample_models,
              load=load_sample_models)
