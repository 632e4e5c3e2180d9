"""check: the filter's questions to the VLM, answered as probabilities; nothing decided.

Per (original, edited) pair, each a yes/no question answered by the probability the VLM gives "yes"
over "no" at the answer position (`VisionLanguageModel.p_yes`), so an answer never hangs on parsing
free text (UPER §3.2.1 and the failure modes of RPO appendix D):

- executed: per instruction, "was it carried out?" on original | edited side by side;
- no_stray: no content that neither the prompt nor the instructions asked for;
- subject_kept: the cut-out subjects side by side are the same subject;
- attributes (unless `check.attributes` is false): the VLM lists the subject's key attributes
  in the original cut-out (generated), and each is verified in the original and in the edited cut-out.

In-process or through a server (`check.engine`); a pair's questions about one image are asked one
after the other with the same image+prompt prefix (a server's prefix cache, or in-process
`check.share_image_prefix`, encodes that image once). `p_source` says where P(yes) came from. A pair
with a question no request could answer is rejected with that failure (`vlm_request_failed: …`).

The thresholds that turn these into keep/drop are the filter stage's (a cheap step after this one,
the `filter:` section): this stage keys on the `check:` section only, so tuning one asks the VLM nothing again.
"""
from __future__ import annotations

import pyarrow as pa

from richpref.common.images import BadImage, decode_image, side_by_side
from ..prompts import load_sections, render, template_hash
from ..schemas.config import CheckConfig, Profile, config_data
from ..schemas.tables import CHECKS, rows_to_table
from .base import Stage, StageInputs, kept, rejected
from .critique import load_vlm, vlm_models
from .vlm_text import ListParseError, parse_list

YES_NO_SECTIONS = ("executed", "no_stray", "subject_kept")
ATTRIBUTE_SECTIONS = ("attributes", "attribute_present")


def load_filter_template(cfg: CheckConfig) -> dict[str, str]:
    sections = load_sections(cfg.template)
    need = YES_NO_SECTIONS + (ATTRIBUTE_SECTIONS if cfg.attributes else ())
    missing = [s for s in need if s not in sections]
    if missing:
        raise ValueError(f"check template {cfg.template!r} has no section(s) {missing}; use filter_v2 or newer, "
                         "or set check.attributes=false to ask no attribute question")
    return sections


def parse_attributes(text: str, max_attributes: int) -> tuple[list[str], str | None]:
    """Listed attributes (at most `max_attributes`), or ([], why) when none can be read."""
    try:
        items = parse_list(text)
    except ListParseError as exc:
        return [], f"unparseable attribute list ({exc})"
    if not items:
        return [], "the model listed no attribute"
    return items[:max_attributes], None


def checking_view(cfg: CheckConfig) -> dict:
    """This stage's key: the whole `check:` section (less the runtime-only fields and a server's
    endpoint), and the launcher where it decides whether answers are probabilities or 0/1."""
    view = config_data(cfg)
    if cfg.engine.answer_key():
        view["answers"] = cfg.engine.answer_key()
    return view


def check_rows(rows: pa.Table, prompts: list, instructions: list, images: dict[str, list], cfg: CheckConfig,
               get_vlm) -> pa.Table:
    """One row of answers per row of `rows` (item_id, candidate); undecodable images reject the row."""
    sections = load_filter_template(cfg)
    ids, cands = rows.column("item_id").to_pylist(), rows.column("candidate").to_pylist()
    out, todo = {}, []
    for k, iid in enumerate(ids):
        try:
            original_cut = decode_image(images["original_cutout"][k])
            edited_cut = decode_image(images["edited_cutout"][k])
            pair = side_by_side(decode_image(images["original"][k]), decode_image(images["edited"][k]))
            todo.append(dict(k=k, iid=iid, prompt=prompts[k], instructions=list(instructions[k] or []), pair=pair,
                             cuts=side_by_side(original_cut, edited_cut), original_cut=original_cut,
                             edited_cut=edited_cut))
        except BadImage as exc:
            out[k] = rejected(iid, str(exc), candidate=cands[k], template=cfg.template)
    if todo:
        vlm = get_vlm()
        per_instruction = "{instruction}" in sections["executed"]
        listed = attribute_lists(vlm, todo, sections, cfg) if cfg.attributes else None
        answers = ask_pairs(vlm, todo, sections, cfg, per_instruction, listed)
        failed_pairs: dict[int, str] = {}
        failed_items = {todo[i]["iid"]: a.error for i, kind, a in answers if a.error and kind == "attr_original"}
        for i, kind, a in answers:
            if a.error:
                failed_pairs.setdefault(i, a.error)
        for i, t in enumerate(todo):  # the original's attributes serve every edit of the item
            if t["iid"] in failed_items:
                failed_pairs.setdefault(i, failed_items[t["iid"]])
        executed_each: list[list[float]] = [[] for _ in todo]
        no_stray, subject = [0.0] * len(todo), [0.0] * len(todo)
        p_orig_by_item: dict[str, list[float]] = {}
        p_edit: list[list[float]] = [[] for _ in todo]
        source = {}
        for i, kind, a in answers:
            if a.error:
                continue
            source[i] = a.source
            if kind == "executed":
                executed_each[i].append(float(a.p))
            elif kind == "no_stray":
                no_stray[i] = float(a.p)
            elif kind == "subject_kept":
                subject[i] = float(a.p)
            elif kind == "attr_original":
                p_orig_by_item.setdefault(todo[i]["iid"], []).append(float(a.p))
            else:
                p_edit[i].append(float(a.p))

        for i, t in enumerate(todo):
            common = dict(candidate=cands[t["k"]], template=cfg.template, model_id=vlm.model_id, p_source=source.get(i))
            if i in failed_pairs:  # a question of this pair got no answer: its answers are incomplete
                out[t["k"]] = rejected(t["iid"], failed_pairs[i], **common)
                continue
            values = dict(common, p_no_stray=float(no_stray[i]), p_subject_kept=float(subject[i]),
                          p_executed_each=executed_each[i])
            if listed is not None:
                attrs, raw, why = listed[t["iid"]]
                values.update(attributes=attrs, attributes_raw=raw, attributes_error=why,
                              p_attr_original=list(p_orig_by_item.get(t["iid"], [])), p_attr_edited=p_edit[i])
            out[t["k"]] = kept(t["iid"], **values)
    return rows_to_table([out[k] for k in range(len(ids))], CHECKS)


def bullets(instructions: list[str]) -> str:
    return "\n".join(f"- {s}" for s in instructions)


def attribute_lists(vlm, todo: list[dict], sections: dict[str, str], cfg: CheckConfig) -> dict[str, tuple]:
    """Per item: (listed attributes, raw text, why none), generated once per item whatever its number
    of edits; a failed request leaves no attribute and says why."""
    first = {}
    for i, t in enumerate(todo):
        first.setdefault(t["iid"], i)
    owners = list(first.values())  # one pair per item stands for its original
    gens = vlm.generate_detailed([todo[i]["original_cut"] for i in owners],
                                 [render(sections["attributes"], max_attributes=cfg.max_attributes) for _ in owners],
                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    listed = {}
    for i, g in zip(owners, gens):
        items, why = ([], g.error) if g.error else parse_attributes(g.text, cfg.max_attributes)
        listed[todo[i]["iid"]] = (items, g.text, why)
    return listed


def pair_questions(todo: list[dict], sections: dict[str, str], per_instruction: bool,
                   listed: dict[str, tuple] | None) -> list[tuple[int, str, object, str]]:
    """Every yes/no question of the shard as (pair, check, image, text), pair by pair and, within a
    pair, image by image: the questions about one image follow each other with the same image+chat
    prefix (a server's prefix cache encodes that image once; in-process they share batches). The
    original cut-out's attributes are asked once per item."""
    qs = []
    seen_items = set()
    for i, t in enumerate(todo):
        ins = t["instructions"] if per_instruction else ["\n".join(t["instructions"])]
        for one in ins:
            qs.append((i, "executed", t["pair"], render(sections["executed"], instruction=one,
                                                         instructions=bullets(t["instructions"]), prompt=t["prompt"])))
        qs.append((i, "no_stray", t["pair"], render(sections["no_stray"], prompt=t["prompt"],
                                                     instructions=bullets(t["instructions"]))))
        qs.append((i, "subject_kept", t["cuts"], render(sections["subject_kept"], prompt=t["prompt"])))
        if listed is None:
            continue
        attrs = listed[t["iid"]][0]
        if t["iid"] not in seen_items:
            seen_items.add(t["iid"])
            qs += [(i, "attr_original", t["original_cut"], render(sections["attribute_present"], attribute=a))
                   for a in attrs]
        qs += [(i, "attr_edited", t["edited_cut"], render(sections["attribute_present"], attribute=a)) for a in attrs]
    return qs


def pair_batches(qs: list, batch_size: int, served: bool) -> list[list]:
    """In-process: batches of whole pairs (a pair's questions are never split; a pair with more
    questions than `batch_size` is one batch). Served: one list, the client keeps its requests in flight."""
    if served or not qs:
        return [qs] if qs else []
    batches, current = [], []
    for k, q in enumerate(qs):
        current.append(q)
        pair_ends = k + 1 == len(qs) or qs[k + 1][0] != q[0]
        if pair_ends and (k + 1 == len(qs) or len(current) + sum(1 for x in qs[k + 1:] if x[0] == qs[k + 1][0])
                          > batch_size):
            batches.append(current)
            current = []
    return batches


def answers_sharing_image(vlm, qs: list, batch_size: int) -> list:
    """In-process: each run of questions about one image encodes that image once, and asks them
    `batch_size` a forward pass on top of it (models/vlm_prefix.py)."""
    from ..models.vlm import YesNo
    from ..models.vlm_prefix import p_yes_sharing_image

    answers, start = [], 0
    while start < len(qs):
        end = start
        while end < len(qs) and qs[end][2] is qs[start][2]:
            end += 1
        p = p_yes_sharing_image(vlm, qs[start][2], [q[3] for q in qs[start:end]], batch_size)
        answers += [YesNo(float(x), "logits") for x in p]
        start = end
    return answers


def ask_pairs(vlm, todo: list[dict], sections: dict[str, str], cfg: CheckConfig, per_instruction: bool,
              listed: dict[str, tuple] | None) -> list[tuple[int, str, object]]:
    """(pair, check, YesNo) per question; a pair whose attribute list failed carries that failure."""
    qs = pair_questions(todo, sections, per_instruction, listed)
    from ..models.vlm import VisionLanguageModel

    if isinstance(vlm, VisionLanguageModel) and cfg.share_image_prefix:
        answers = answers_sharing_image(vlm, qs, cfg.batch_size)
    else:
        answers = []
    for chunk in ([] if answers or not qs else pair_batches(qs, cfg.batch_size, served=hasattr(vlm, "served_name"))):
        # batch size 1 (what out-of-memory retries end at) still asks one question at a time
        answers += vlm.yes_no([q[2] for q in chunk], [q[3] for q in chunk],
                              batch_size=len(chunk) if cfg.batch_size > 1 else 1)
    out = [(i, kind, a) for (i, kind, _, _), a in zip(qs, answers)]
    if listed is not None:
        from ..models.vlm import YesNo

        for i, t in enumerate(todo):
            why = listed[t["iid"]][2]
            if why and why.startswith("vlm_"):
                out.append((i, "attributes", YesNo(None, "answer", why)))
    return out


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    cfg = profile.check
    rows = inputs.rows
    edits = inputs.lookup("edit", ["image", "edit_instructions"])
    images = {
        "original": inputs.lookup("sample", ["image"]).column("image").to_pylist(),
        "edited": edits.column("image").to_pylist(),
        "original_cutout": rows.column("original_cutout").to_pylist(),
        "edited_cutout": rows.column("edited_cutout").to_pylist(),
    }
    meta = inputs.lookup("instruct", ["prompt", "instructions"])
    # Only the instructions that reached the editor's text encoders are asked about (tasks/edit_prompts.py).
    reached = [used if used is not None else every for used, every in
               zip(edits.column("edit_instructions").to_pylist(), meta.column("instructions").to_pylist())]
    return check_rows(rows.select(["item_id", "candidate"]), meta.column("prompt").to_pylist(),
                      reached, images, cfg, lambda: load_vlm(cfg, profile.models_root))


STAGE = Stage(name="check", version="3", section="check", reads=("cutout", "sample", "edit", "instruct"),
              compute=compute, key_extra=lambda p: template_hash(p.check.template), config_view=checking_view,
              schema=CHECKS, **vlm_models("check"))
