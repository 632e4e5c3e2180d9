"""instruct: image + prompt + critique -> short executable edit instructions (Qwen2.5-VL, RPO §3.3).

The model's answer is parsed (JSON array, bullets or lines; markdown removed; sentences that share a
line split into instructions) and guarded against the failure modes RPO reports (appendix D):

- truncated output: when `max_new_tokens` cut the answer, its last instruction may be cut mid-way
  and is dropped (`drop_truncated`);
- no edit: an answer that only says the image needs no edit rejects the row (`no_edit_needed`);
  remarks about the edits ("This will make ...") are dropped as `commentary`;
- contradiction: an instruction that removes, replaces or recolours what the prompt asks for
  ("Replace the ice cream with a chocolate bar") is dropped (`drop_contradictions`);
- stray content: an instruction sharing (almost) no content word with the prompt and critique
  (prompt only in the one-step variant) is dropped (`min_grounding`); one without any content word
  is vague (`drop_vague`);
- absent targets: for instructions that change or remove something, the VLM is asked whether the
  image shows that thing; below `min_visible` the instruction is dropped;
- model-judged faithfulness (optional): the VLM is asked whether each instruction serves the prompt
  without contradicting it or adding unrelated content; below `min_faithful` it is dropped.

Empty, unparseable, overlong or too long lists reject the row; so does a row left without any
instruction. Every dropped instruction is kept with its reason, and the raw text always is.
`one_step: true` asks for instructions from image + prompt alone (RPO's ablation).
The text guards' precision and recall on a corpus of realistic answers: docs/instruction_guards.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from richpref.common.images import BadImage, decode_image
from ..prompts import load_template, render, template_hash
from ..schemas.config import InstructConfig, Profile
from ..schemas.tables import INSTRUCTIONS, rows_to_table
from .base import Stage, StageInputs, kept, rejected
from .critique import load_vlm, vlm_models
from .instruction_guards import contradiction, is_commentary, says_no_edit, split_sentences
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


def check_text(text: str, finished: bool, prompt: str, critique: str | None, cfg: InstructConfig) -> Checked:
    """Parse one output and apply the guards that need no model: truncation, no-edit answers,
    commentary, size, vagueness, contradiction of the prompt and grounding."""
    out = Checked()
    try:
        out.items = instruction_items(text)
    except ListParseError as exc:
        out.reject = f"unparseable_instructions: {exc}"
        return out
    if not finished and cfg.drop_truncated and out.items:
        out.drop({len(out.items) - 1: f"truncated: the output hit instruct.max_new_tokens={cfg.max_new_tokens}"})
        if not out.items:
            out.reject = out.reasons[0]
            return out
    no_edit = {k: f"no_edit_needed: the model says the image needs no edit ({s!r})"
               for k, s in enumerate(out.items) if says_no_edit(s)}
    remarks = {k: "commentary: a remark about the edits, not an edit" for k, s in enumerate(out.items)
               if k not in no_edit and k > 0 and is_commentary(s)}
    if no_edit and len(no_edit) + len(remarks) == len(out.items):
        out.reject = next(iter(no_edit.values()))
        return out
    out.drop({**no_edit, **remarks})
    out.reject = size_reason(out.items, cfg)
    if out.reject:
        return out
    context = grounding_context(prompt, critique, cfg)
    source = "prompt" if cfg.one_step else "prompt+critique"
    drops = {}
    for k, item in enumerate(out.items):
        g = grounding(item, context)
        why = contradiction(item, prompt) if cfg.drop_contradictions else None
        if g is None and cfg.drop_vague:
            drops[k] = "vague_instruction: no content word to check against the prompt"
        elif why:
            drops[k] = f"contradicts_prompt: {why}"
        elif g is not None and cfg.min_grounding > 0 and g < cfg.min_grounding:
            drops[k] = (f"ungrounded: {g:.2f} of its content words are in the {source} "
                        f"(< instruct.min_grounding={cfg.min_grounding})")
    out.drop(drops)
    return out


def instruction_items(text: str) -> list[str]:
    """The instructions of a model's answer: its list items (markdown removed), split into sentences."""
    return [s for item in parse_list(text) for s in split_sentences(item)]


# Drops that are not a guard failing on an instruction: they never reject a row under "reject_row".
NOT_FAILURES = ("truncated:", "commentary:", "no_edit_needed:")


def finish(checked: Checked, cfg: InstructConfig) -> str | None:
    """The row's reject reason once every guard ran, or None to keep it."""
    if checked.reject:
        return checked.reject
    guard_drops = [r for r in checked.reasons if not r.startswith(NOT_FAILURES)]
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
                   check_text(g.text, g.finished, r["prompt"], r.get("critique"), cfg)
                   for (r, _), g in zip(todo, gens)]
        sources: dict[int, str] = {}
        if cfg.min_visible > 0:
            sources.update(drop_invisible(vlm, [img for _, img in todo], checked, cfg))
        if cfg.min_faithful > 0:
            sources.update(drop_unfaithful(vlm, [img for _, img in todo], [r["prompt"] for r, _ in todo], checked, cfg))
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
    Returns, per row asked, where its P(yes) came from ("logits", "logprobs" or "answer")."""
    asks = [(row, k, target) for row, c in enumerate(checked) if not c.reject
            for k, target in enumerate(map(instruction_target, c.items)) if target]
    question = load_template(cfg.visible_template)
    return ask_and_drop(vlm, images, checked, [(row, k, render(question, target=t)) for row, k, t in asks],
                        cfg.min_visible, cfg.batch_size,
                        lambda j, p: (f"not_visible: P(yes)={p:.3f} that the image shows {asks[j][2]!r} "
                                      f"(< instruct.min_visible={cfg.min_visible})"))


def drop_unfaithful(vlm, images: list, prompts: list[str], checked: list[Checked], cfg: InstructConfig) -> dict[int, str]:
    """Ask, in one batched pass, whether each instruction serves its prompt; drop those judged not to."""
    question = load_template(cfg.faithful_template)
    asks = [(row, k, render(question, prompt=prompts[row], instruction=item))
            for row, c in enumerate(checked) if not c.reject for k, item in enumerate(c.items)]
    return ask_and_drop(vlm, images, checked, asks, cfg.min_faithful, cfg.batch_size,
                        lambda j, p: (f"judged_unfaithful: P(yes)={p:.3f} that it serves the prompt without "
                                      f"contradicting it (< instruct.min_faithful={cfg.min_faithful})"))


def ask_and_drop(vlm, images: list, checked: list[Checked], asks: list[tuple[int, int, str]], threshold: float,
                 batch_size: int, reason) -> dict[int, str]:
    """One batched yes/no pass over (row, instruction index, question); drop where P(yes) < threshold,
    with `reason(ask index, P(yes))`. Returns where each asked row's P(yes) came from."""
    if not asks:
        return {}
    answers = vlm.yes_no([images[row] for row, _, _ in asks], [q for _, _, q in asks], batch_size=batch_size)
    drops: dict[int, dict[int, str]] = {}
    sources: dict[int, str] = {}
    for j, ((row, k, _), answer) in enumerate(zip(asks, answers)):
        sources[row] = answer.source
        if answer.error:  # the question could not be answered: the row is rejected with the reason
            checked[row].reject = checked[row].reject or answer.error
            continue
        if answer.p < threshold:
            drops.setdefault(row, {})[k] = reason(j, float(answer.p))
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
    if cfg.min_faithful > 0:
        parts.append(template_hash(cfg.faithful_template))
    return ":".join(parts)


STAGE = Stage(name="instruct", version="5", section="instruct", reads=("critique", "sample"), compute=compute,
              key_extra=_key_extra, schema=INSTRUCTIONS, **vlm_models("instruct"))
