"""filter: a VLM checks each (original, edited) pair and keeps or drops it, with a reason per check.

Checks (UPER §3.2.1 and the failure modes of RPO appendix D), each a yes/no question answered by the
probability the VLM gives "yes" over "no" at the answer position (`VisionLanguageModel.p_yes`), so
a verdict never hangs on parsing free text:

- executed: per instruction, "was it carried out?" on original | edited side by side; the
  per-instruction P(yes) are reduced by mean or min (`executed_reduce`) against `min_executed`;
- no_stray: no content that neither the prompt nor the instructions asked for (`min_no_stray`);
- subject_kept: the cut-out subjects side by side are the same subject (`min_subject_kept`);
- attributes: the VLM lists the subject's key attributes in the original cut-out (generated), each is
  verified in the original and in the edited cut-out; of those present in the original and not named
  by an instruction, at least `min_attributes_kept` must still be present in the edit.

`reason` lists every failed check as `code: detail`; `checks` holds every check's outcome as JSON.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from ..images import BadImage, decode_image, side_by_side
from ..prompts import load_sections, render, template_hash
from ..schemas.config import FilterConfig, Profile
from ..schemas.tables import VERDICTS, rows_to_table
from .base import Stage, StageInputs, kept, rejected
from .critique import load_vlm
from .vlm_text import ListParseError, content_words, parse_list

# check name -> reject code when it fails
FAIL_CODES = {"executed": "not_executed", "no_stray": "stray_content", "subject_kept": "subject_changed",
              "attributes": "attributes_lost"}
YES_NO_SECTIONS = ("executed", "no_stray", "subject_kept")
ATTRIBUTE_SECTIONS = ("attributes", "attribute_present")


def attributes_enabled(cfg: FilterConfig) -> bool:
    return cfg.min_attributes_kept > 0


def load_filter_template(cfg: FilterConfig) -> dict[str, str]:
    sections = load_sections(cfg.template)
    need = YES_NO_SECTIONS + (ATTRIBUTE_SECTIONS if attributes_enabled(cfg) else ())
    missing = [s for s in need if s not in sections]
    if missing:
        raise ValueError(f"filter template {cfg.template!r} has no section(s) {missing}; use filter_v2 or newer, "
                         "or set filter.min_attributes_kept=0 to turn the attribute check off")
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


def attribute_check(attrs: list[str], p_orig: list[float], p_edit: list[float], instructions: list[str],
                    cfg: FilterConfig) -> tuple[list[bool], float | None, str]:
    """(exempt flags, share kept or None, outcome) for one pair; outcome is "pass", "fail: …" or "skipped: …".

    An attribute is checked when the original shows it (P >= min_attribute_present) and no instruction
    names it (it shares no content word with the instructions); it is kept when the edit shows it too.
    """
    instructed = content_words(" ".join(instructions)) if cfg.exempt_instructed_attributes else set()
    exempt = [bool(content_words(a) & instructed) for a in attrs]
    checked = [j for j in range(len(attrs)) if p_orig[j] >= cfg.min_attribute_present and not exempt[j]]
    if not checked:
        why = f"none of the {len(attrs)} listed attributes is present in the original and unnamed by the instructions"
        return exempt, None, ("fail: " if cfg.on_no_attributes == "drop" else "skipped: ") + why
    lost = [j for j in checked if p_edit[j] < cfg.min_attribute_present]
    share = 1.0 - len(lost) / len(checked)
    if share >= cfg.min_attributes_kept:
        return exempt, share, "pass"
    named = ", ".join(f"{attrs[j]!r} (P={p_edit[j]:.3f})" for j in lost)
    return exempt, share, (f"fail: {share:.2f} of {len(checked)} attributes kept "
                           f"(< filter.min_attributes_kept={cfg.min_attributes_kept}); lost {named}")


def threshold_outcome(p: float, minimum: float, field: str) -> str:
    return "pass" if p >= minimum else f"fail: P(yes)={p:.3f} < filter.{field}={minimum}"


def filter_rows(rows: pa.Table, prompts: list, instructions: list, images: dict[str, list], cfg: FilterConfig,
                get_vlm) -> pa.Table:
    """One verdict per row of `rows` (item_id, candidate)."""
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
            out[k] = rejected(iid, str(exc), candidate=cands[k], verdict="drop", template=cfg.template)
    if todo:
        vlm = get_vlm()
        per_instruction = "{instruction}" in sections["executed"]
        listed = attribute_lists(vlm, todo, sections, cfg) if attributes_enabled(cfg) else None
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
        attrs = attr_p = None
        if listed is not None:
            attrs = [listed[t["iid"]] for t in todo]
            attr_p = [(list(p_orig_by_item.get(t["iid"], [])), p_edit[i]) for i, t in enumerate(todo)]

        for i, t in enumerate(todo):
            each = executed_each[i]
            p_exec = float(min(each) if cfg.executed_reduce == "min" else np.mean(each)) if each else 0.0
            checks = {
                "executed": threshold_outcome(p_exec, cfg.min_executed, "min_executed") if each
                else "fail: the pair has no instruction",
                "no_stray": threshold_outcome(float(no_stray[i]), cfg.min_no_stray, "min_no_stray"),
                "subject_kept": threshold_outcome(float(subject[i]), cfg.min_subject_kept, "min_subject_kept"),
            }
            values = dict(candidate=cands[t["k"]], p_executed=p_exec, p_no_stray=float(no_stray[i]), p_subject_kept=float(subject[i]),
                          p_executed_each=each, template=cfg.template, model_id=vlm.model_id, p_source=source.get(i))
            if i in failed_pairs:  # a question of this pair got no answer: no verdict can be given
                out[t["k"]] = rejected(t["iid"], failed_pairs[i], verdict="drop", candidate=cands[t["k"]],
                                       template=cfg.template, model_id=vlm.model_id, p_source=source.get(i))
                continue
            if attrs is not None:
                listed, raw, why = attrs[i]
                p_orig, p_edit = attr_p[i]
                if why:
                    exempt, share = [], None
                    checks["attributes"] = ("fail: " if cfg.on_no_attributes == "drop" else "skipped: ") + why
                else:
                    exempt, share, checks["attributes"] = attribute_check(listed, p_orig, p_edit, t["instructions"], cfg)
                values.update(attributes=listed, attributes_raw=raw, p_attr_original=p_orig, p_attr_edited=p_edit,
                              attr_exempt=exempt, attributes_kept=share)
            else:
                checks["attributes"] = "skipped: filter.min_attributes_kept=0"
            failed = [f"{FAIL_CODES[name]}: {outcome[len('fail: '):]}" for name, outcome in checks.items()
                      if outcome.startswith("fail")]
            values["checks"] = json.dumps(checks, sort_keys=True)
            out[t["k"]] = (rejected(t["iid"], "; ".join(failed), verdict="drop", **values) if failed
                           else kept(t["iid"], verdict="keep", **values))
    return rows_to_table([out[k] for k in range(len(ids))], VERDICTS)


def bullets(instructions: list[str]) -> str:
    return "\n".join(f"- {s}" for s in instructions)


def attribute_lists(vlm, todo: list[dict], sections: dict[str, str], cfg: FilterConfig) -> dict[str, tuple]:
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


def answers_sharing_image(vlm, qs: list) -> list:
    """In-process: each run of questions about one image encodes that image once (models/vlm_prefix.py)."""
    from ..models.vlm import YesNo
    from ..models.vlm_prefix import p_yes_sharing_image

    answers, start = [], 0
    while start < len(qs):
        end = start
        while end < len(qs) and qs[end][2] is qs[start][2]:
            end += 1
        p = p_yes_sharing_image(vlm, qs[start][2], [q[3] for q in qs[start:end]])
        answers += [YesNo(float(x), "logits") for x in p]
        start = end
    return answers


def ask_pairs(vlm, todo: list[dict], sections: dict[str, str], cfg: FilterConfig, per_instruction: bool,
              listed: dict[str, tuple] | None) -> list[tuple[int, str, object]]:
    """(pair, check, YesNo) per question; a pair whose attribute list failed carries that failure."""
    qs = pair_questions(todo, sections, per_instruction, listed)
    from ..models.vlm import VisionLanguageModel

    if isinstance(vlm, VisionLanguageModel) and cfg.share_image_prefix:
        answers = answers_sharing_image(vlm, qs)
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
    cfg = profile.filter
    rows = inputs.rows
    images = {
        "original": inputs.lookup("sample", ["image"]).column("image").to_pylist(),
        "edited": inputs.lookup("edit", ["image"]).column("image").to_pylist(),
        "original_cutout": rows.column("original_cutout").to_pylist(),
        "edited_cutout": rows.column("edited_cutout").to_pylist(),
    }
    meta = inputs.lookup("instruct", ["prompt", "instructions"])
    return filter_rows(rows.select(["item_id", "candidate"]), meta.column("prompt").to_pylist(),
                       meta.column("instructions").to_pylist(), images, cfg,
                       lambda: load_vlm(cfg, profile.models_root))


STAGE = Stage(name="filter", version="3", section="filter", reads=("cutout", "sample", "edit", "instruct"),
              compute=compute, key_extra=lambda p: template_hash(p.filter.template))
