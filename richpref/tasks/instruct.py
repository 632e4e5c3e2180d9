"""instruct: image + prompt + critique -> short executable edit instructions (Qwen2.5-VL, RPO §3.3).

The model's list is parsed (JSON array, bullets or lines) and guarded against the failure modes RPO
reports (appendix D):

- truncated output: when `max_new_tokens` cut the answer, its last instruction may be cut mid-way
  and is dropped (`drop_truncated`);
- stray content: an instruction whose content words are mostly absent from the prompt and critique
  (prompt only in the one-step variant) is dropped (`min_grounding`);
- absent targets: for instructions that change or remove something, the VLM is asked whether the
  image shows that thing; below `min_visible` the instruction is dropped.

Empty, unparseable, overlong or too long lists reject the row; so does a row left without any
instruction. Every dropped instruction is kept with its reason, and the raw text always is.
`one_step: true` asks for instructions from image + prompt alone (RPO's ablation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from ..images import BadImage, decode_image
from ..prompts import load_template, render, template_hash
from ..schemas.config import InstructConfig, Profile
from ..schemas.tables import INSTRUCTIONS, rows_to_table
from .base import Stage, StageInputs, kept, rejected
from .critique import load_vlm
from .vlm_text import ListParseError, grounding, instruction_target, parse_list


def template_name(cfg: InstructConfig) -> str:
    return cfg.onestep_template if cfg.one_step else cfg.template


def instruct_prompt(template: str, prompt: str, critique: str | None, cfg: InstructConfig) -> str:
    """The text sent with the image; the one-step variant never sees the critique."""
    return render(template, prompt=prompt, critique="" if cfg.one_step else (critique or ""),
                  max_instructions=cfg.max_instructions)


def grounding_context(prompt: str, critique: str | None, cfg: InstructConfig) -> str:
    """What instructions may talk about: the prompt, plus the critique in the two-step variant."""
    return prompt if cfg.one_step else f"{prompt}\n{critique or ''}"


@dataclass
class Checked:
    """Instructions of one row after the text guards: kept ones, dropped ones with reasons, or a reject."""

    items: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    reject: str | None = None

    def drop(self, reasons: dict[int, str]) -> None:
        """Move the items at these indices (-> reason) to `dropped`, keeping the model's order."""
        for k in sorted(reasons):
            self.dropped.append(self.items[k])
            self.reasons.append(reasons[k])
        self.items = [s for k, s in enumerate(self.items) if k not in reasons]


def size_reason(items: list[str], cfg: InstructConfig) -> str | None:
    """Why a parsed list is unusable as a whole (empty, an overlong item, too many items), or None."""
    if not items:
        return "no_instructions: the model output has no instruction line"
    too_long = [s for s in items if len(s) > cfg.max_instruction_chars]
    if too_long:
        return (f"overlong_instruction: {len(too_long[0])} characters, over "
                f"instruct.max_instruction_chars={cfg.max_instruction_chars}")
    if len(items) > cfg.max_instructions:
        return f"too_many_instructions: {len(items)}, over instruct.max_instructions={cfg.max_instructions}"
    return None


def check_text(text: str, finished: bool, context: str, cfg: InstructConfig) -> Checked:
    """Parse one output and apply the guards that need no model: truncation, size, grounding."""
    out = Checked()
    try:
        out.items = parse_list(text)
    except ListParseError as exc:
        out.reject = f"unparseable_instructions: {exc}"
        return out
    if not finished and cfg.drop_truncated and out.items:
        out.drop({len(out.items) - 1: f"truncated: the output hit instruct.max_new_tokens={cfg.max_new_tokens}"})
        if not out.items:
            out.reject = out.reasons[0]
            return out
    out.reject = size_reason(out.items, cfg)
    if out.reject or cfg.min_grounding <= 0:
        return out
    source = "prompt" if cfg.one_step else "prompt+critique"
    drops = {}
    for k, item in enumerate(out.items):
        g = grounding(item, context)
        if g is None:
            drops[k] = "vague_instruction: no content word to check against the prompt"
        elif g < cfg.min_grounding:
            drops[k] = (f"ungrounded: {g:.2f} of its content words are in the {source} "
                        f"(< instruct.min_grounding={cfg.min_grounding})")
    out.drop(drops)
    return out


def finish(checked: Checked, cfg: InstructConfig) -> str | None:
    """The row's reject reason once every guard ran, or None to keep it."""
    if checked.reject:
        return checked.reject
    guard_drops = [r for r in checked.reasons if not r.startswith("truncated:")]
    if guard_drops and cfg.on_guard_fail == "reject_row":
        return guard_drops[0]
    if not checked.items:
        return f"no_instructions_left: every instruction was dropped ({checked.reasons[0]})"
    return None


def instruct_rows(rows: pa.Table, images: list, cfg: InstructConfig, get_vlm) -> pa.Table:
    template = load_template(template_name(cfg))
    out, todo = {}, []
    for r, data in zip(rows.to_pylist(), images):
        try:
            todo.append((r, decode_image(data)))
        except BadImage as exc:
            out[r["item_id"]] = rejected(r["item_id"], str(exc), prompt=r["prompt"], template=template_name(cfg))
    if todo:
        vlm = get_vlm()
        prompts = [instruct_prompt(template, r["prompt"], r.get("critique"), cfg) for r, _ in todo]
        gens = vlm.generate_detailed([img for _, img in todo], prompts, max_new_tokens=cfg.max_new_tokens,
                                     batch_size=cfg.batch_size)
        checked = [Checked(reject=g.error) if g.error else
                   check_text(g.text, g.finished, grounding_context(r["prompt"], r.get("critique"), cfg), cfg)
                   for (r, _), g in zip(todo, gens)]
        sources = drop_invisible(vlm, [img for _, img in todo], checked, cfg) if cfg.min_visible > 0 else {}
        for row, ((r, _), g, c) in enumerate(zip(todo, gens, checked)):
            common = dict(prompt=r["prompt"], raw=g.text, truncated=not g.finished, dropped_instructions=c.dropped,
                          drop_reasons=c.reasons, template=template_name(cfg), model_id=vlm.model_id,
                          visible_source=sources.get(row))
            reason = finish(c, cfg)
            out[r["item_id"]] = (rejected(r["item_id"], reason, **common) if reason
                                 else kept(r["item_id"], instructions=c.items, **common))
    return rows_to_table([out[i] for i in rows.column("item_id").to_pylist()], INSTRUCTIONS)


def drop_invisible(vlm, images: list, checked: list[Checked], cfg: InstructConfig) -> dict[int, str]:
    """Ask, in one batched pass, whether each instruction's target is in its image; drop the absent.
    Returns, per row asked, where its P(yes) came from ("logits", "logprobs" or "answer"); a row whose
    question could not be answered is rejected with the reason."""
    question = load_template(cfg.visible_template)
    asks = []  # (row, instruction index, target)
    for row, c in enumerate(checked):
        if c.reject:
            continue
        for k, instruction in enumerate(c.items):
            target = instruction_target(instruction)
            if target:
                asks.append((row, k, target))
    if not asks:
        return {}
    answers = vlm.yes_no([images[row] for row, _, _ in asks], [render(question, target=t) for _, _, t in asks],
                         batch_size=cfg.batch_size)
    drops: dict[int, dict[int, str]] = {}
    sources: dict[int, str] = {}
    for (row, k, target), answer in zip(asks, answers):
        sources[row] = answer.source
        if answer.error:
            checked[row].reject = checked[row].reject or answer.error
            continue
        p_yes = answer.p
        if p_yes < cfg.min_visible:
            drops.setdefault(row, {})[k] = (f"not_visible: P(yes)={p_yes:.3f} that the image shows {target!r} "
                                            f"(< instruct.min_visible={cfg.min_visible})")
    for row, reasons in drops.items():
        checked[row].drop(reasons)
    return sources


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.instruct
    images = inputs.lookup("sample", ["image"]).column("image").to_pylist()
    return instruct_rows(inputs.rows, images, cfg, lambda: load_vlm(cfg, profile.models_root))


def _key_extra(profile: Profile) -> str:
    cfg = profile.instruct
    parts = [template_hash(template_name(cfg))]
    if cfg.min_visible > 0:
        parts.append(template_hash(cfg.visible_template))
    return ":".join(parts)


STAGE = Stage(name="instruct", version="2", section="instruct", reads=("critique", "sample"), compute=compute,
              key_extra=_key_extra)
