"""What the generative judges share: their VLM (in-process or served), questions of several images
with text between them, and greedy answers.

A question is a list of parts, each a `str` (text) or a PIL image, sent as one user turn in that
order. In-process the parts become the processor's chat-template content (`{"type": "image"}`,
`{"type": "text"}`) and the images go to the processor in the same order; served they become the
OpenAI content list (`image_url` as a PNG data URL, `text`), which the server renders with the same
chat template. Answers are greedy (temperature 0), so both backends give the same text.

A LoRA adapter (EditScore) is merged into its base once and the merged model is written under
`RICHPREF_CACHE` (default ~/.cache/richpref/merged/<hash>), which is what a launched server serves;
in-process the merged weights are used directly.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence, Union

import torch
from PIL import Image

from ...schemas.vlm_engines import engine_of
from ..runtime import peft_wrapping
from ..vlm import Generation, VisionLanguageModel
from ..vlm_engine import load_vlm

log = logging.getLogger("richpref")

Part = Union[str, Image.Image]


def merged_dir(base: str, adapter: str) -> Path:
    """`base` with the LoRA `adapter` merged in, saved once (keyed by both paths and the adapter's bytes)."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    weights = sorted(Path(adapter).glob("adapter_model.*"))
    h = hashlib.sha256(f"{Path(base).resolve()}|{Path(adapter).resolve()}".encode())
    for w in weights:
        h.update(w.read_bytes())
    root = Path(os.environ.get("RICHPREF_CACHE") or Path.home() / ".cache" / "richpref") / "merged"
    out = root / h.hexdigest()[:16]
    if (out / "config.json").is_file():
        return out
    model = AutoModelForImageTextToText.from_pretrained(base, dtype="auto")
    with peft_wrapping():
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    AutoProcessor.from_pretrained(base).save_pretrained(tmp)
    if out.exists():  # another process merged it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    log.info("merged LoRA %s into %s -> %s", adapter, base, out)
    return out


def qwen_resize(image: Image.Image, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                max_pixels: int = 16384 * 28 * 28) -> Image.Image:
    """The Qwen-VL reference's own resize (qwen_vl_utils): each side to a multiple of `factor`, the
    area into [min_pixels, max_pixels], aspect kept, bicubic. Done before either backend sees the
    image, so the server gets the pixels the in-process model gets."""
    from .qwen_head import smart_size

    hb, wb = smart_size(image.height, image.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    rgb = image.convert("RGB")
    return rgb if (wb, hb) == rgb.size else rgb.resize((wb, hb), Image.Resampling.BICUBIC)


def model_type(path: str) -> str:
    import json

    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError):
        return ""


def judge_engine(engine, images: int):
    """`engine` with a launched server allowed `images` images per request (richpref launches one with
    one, what the VLM stages send) where its declaration has an option for it (vLLM's
    --limit-mm-per-prompt); unchanged when the user's `extra_args` already set it."""
    flag = engine_of(engine).images_flag if engine is not None else None
    if flag is None or images <= 1 or flag in engine.extra_args:
        return engine
    import json

    # vLLM's parser keeps the last value of a repeated option: this one, appended after the default.
    return engine.model_copy(update={"extra_args": [*engine.extra_args, flag, json.dumps({"image": images})]})


def load_judge_vlm(path: str, *, engine=None, adapter: str | None = None, device: str = "auto",
                   dtype: str = "auto", images: int = 1):
    """The judge's VLM on its engine (models/vlm_engine.py): in-process (`VisionLanguageModel`) or a
    client of a server (`ServedVLM`) that takes `images` images per question."""
    engine = judge_engine(engine, images)
    if adapter is not None and not (engine is not None and engine.weights_elsewhere):
        path = str(merged_dir(path, adapter))
    return load_vlm(engine, path, device=device, dtype=dtype, max_new_tokens=1024)


def _in_process(vlm: VisionLanguageModel, questions: Sequence[Sequence[Part]], max_new_tokens: int,
                batch_size: int) -> list[Generation]:
    proc, tok = vlm.processor, vlm.tokenizer
    eos_ids = vlm._eos_ids()
    out: list[Generation] = []
    with torch.inference_mode():
        for start in range(0, len(questions), batch_size):
            batch = questions[start:start + batch_size]
            texts, images = [], []
            for parts in batch:
                content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]
                texts.append(proc.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False))
                images += [p.convert("RGB") for p in parts if not isinstance(p, str)]
            if vlm.image_caps is not None:
                images = [vlm.image_caps.apply(im) for im in images]
            inputs = proc(images=images, text=texts, padding=True, return_tensors="pt")
            inputs = {k: v.to(vlm.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
                inputs["pixel_values"] = inputs["pixel_values"].to(vlm.model.dtype)
            generated = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                           temperature=None, top_p=None, top_k=None)
            for row in generated[:, inputs["input_ids"].shape[1]:].tolist():
                end = next((k for k, t in enumerate(row) if t in eos_ids), None)
                kept = row if end is None else row[:end]
                out.append(Generation(text=tok.decode(kept, skip_special_tokens=True).strip(),
                                      finished=end is not None, new_tokens=len(kept)))
    return out


def _served(vlm, questions: Sequence[Sequence[Part]], max_new_tokens: int) -> list[Generation]:
    from ..vlm_client import RowFailure, image_data_url

    def body(k: int) -> dict:
        content = [{"type": "text", "text": p} if isinstance(p, str)
                   else {"type": "image_url", "image_url": {"url": image_data_url(p, vlm.image_caps)}}
                   for p in questions[k]]
        return {"model": vlm.served_name, "messages": [{"role": "user", "content": content}],
                "temperature": 0.0, "max_tokens": max_new_tokens}

    def parse(data: dict) -> Generation:
        choice = data["choices"][0]
        return Generation(text=(choice["message"]["content"] or "").strip(),
                          finished=choice.get("finish_reason") != "length", new_tokens=0)

    results = vlm._run(len(questions), body, parse)
    return [Generation(text="", finished=False, new_tokens=0, error=r.reason) if isinstance(r, RowFailure) else r
            for r in results]


def ask(vlm, questions: Sequence[Sequence[Part]], *, max_new_tokens: int, batch_size: int = 8) -> list[Generation]:
    """Greedy answers to `questions` (lists of text and image parts), in order."""
    if not questions:
        return []
    if isinstance(vlm, VisionLanguageModel):
        return _in_process(vlm, questions, max_new_tokens, batch_size)
    return _served(vlm, questions, max_new_tokens)


__all__ = ["Part", "ask", "judge_engine", "load_judge_vlm", "merged_dir", "model_type", "qwen_resize"]
