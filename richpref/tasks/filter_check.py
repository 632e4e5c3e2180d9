"""check: the filter's questions to the VLM, answered as probabilities; nothing decided.

Per (original, edited) pair, each a yes/no question answered by the probability the VLM gives "yes"
over "no" at the answer position (`VisionLanguageModel.p_yes`), so an answer never hangs on parsing
free text (UPER §3.2.1 and the failure modes of RPO appendix D):

- executed: per instruction, "was it carried out?" on original | edited side by side;
- no_stray: no content that neither the prompt nor the instructions asked for;
- subject_kept: the cut-out subjects side by side are the same subject;
- attributes (unless `filter.min_attributes_kept` is 0): the VLM lists the subject's key attributes
  in the original cut-out (generated), and each is verified in the original and in the edited cut-out.

The thresholds that turn these into keep/drop are the filter stage's (a cheap step after this one):
they are not part of this stage's key, so tuning one asks the VLM nothing again.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..images import BadImage, decode_image, side_by_side
from ..prompts import load_sections, render, template_hash
from ..schemas.config import FilterConfig, Profile
from ..schemas.tables import CHECKS, rows_to_table
from .base import Stage, StageInputs, kept, rejected
from .critique import load_vlm
from .vlm_text import ListParseError, parse_list

YES_NO_SECTIONS = ("executed", "no_stray", "subject_kept")
ATTRIBUTE_SECTIONS = ("attributes", "attribute_present")
# The thresholds and rules applied to the answers: the filter stage's, not this stage's key.
DECISION_FIELDS = frozenset({"min_executed", "executed_reduce", "min_no_stray", "min_subject_kept", "min_attribute_present",
                             "min_attributes_kept", "exempt_instructed_attributes", "on_no_attributes"})
RUNTIME = frozenset({"batch_size", "device", "dtype"})


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


def checking_view(cfg: FilterConfig) -> dict:
    """What decides the answers (this stage's key): the model, template and generation settings, and
    whether the attributes are asked about at all; not the thresholds."""
    view = cfg.model_dump(mode="json", exclude=set(DECISION_FIELDS | RUNTIME))
    view["attributes"] = attributes_enabled(cfg)
    return view


def check_rows(rows: pa.Table, prompts: list, instructions: list, images: dict[str, list], cfg: FilterConfig,
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

        def ask(imgs: list, texts: list[str]) -> np.ndarray:
            return vlm.p_yes(imgs, texts, batch_size=cfg.batch_size)

        # executed: one question per instruction when the template names {instruction}, else one per pair.
        per_instruction = "{instruction}" in sections["executed"]
        exec_asks = [(i, ins) for i, t in enumerate(todo)
                     for ins in (t["instructions"] if per_instruction else ["\n".join(t["instructions"])])]
        exec_p = ask([todo[i]["pair"] for i, _ in exec_asks],
                     [render(sections["executed"], instruction=ins, instructions=bullets(todo[i]["instructions"]),
                             prompt=todo[i]["prompt"]) for i, ins in exec_asks])
        executed_each: list[list[float]] = [[] for _ in todo]
        for (i, _), p in zip(exec_asks, exec_p):
            executed_each[i].append(float(p))
        no_stray = ask([t["pair"] for t in todo],
                       [render(sections["no_stray"], prompt=t["prompt"], instructions=bullets(t["instructions"]))
                        for t in todo])
        subject = ask([t["cuts"] for t in todo], [render(sections["subject_kept"], prompt=t["prompt"]) for t in todo])

        attrs, attr_p = attribute_probabilities(vlm, todo, sections, cfg) if attributes_enabled(cfg) else (None, None)

        for i, t in enumerate(todo):
            values = dict(candidate=cands[t["k"]], p_no_stray=float(no_stray[i]), p_subject_kept=float(subject[i]),
                          p_executed_each=executed_each[i], template=cfg.template, model_id=vlm.model_id)
            if attrs is not None:
                listed, raw, why = attrs[i]
                values.update(attributes=listed, attributes_raw=raw, attributes_error=why,
                              p_attr_original=attr_p[i][0], p_attr_edited=attr_p[i][1])
            out[t["k"]] = kept(t["iid"], **values)
    return rows_to_table([out[k] for k in range(len(ids))], CHECKS)


def bullets(instructions: list[str]) -> str:
    return "\n".join(f"- {s}" for s in instructions)

def attribute_probabilities(vlm, todo: list[dict], sections: dict[str, str], cfg: FilterConfig):
    """Per pair: (listed attributes, raw text, why none) and (P present in original, P present in edit).
    The original's attributes are listed and verified once per item, whatever its number of edits."""
    first = {}
    for i, t in enumerate(todo):
        first.setdefault(t["iid"], i)
    owners = list(first.values())  # one pair per item stands for its original
    gens = vlm.generate_detailed([todo[i]["original_cut"] for i in owners],
                                 [render(sections["attributes"], max_attributes=cfg.max_attributes) for _ in owners],
                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    listed_by_item = {}
    for i, g in zip(owners, gens):
        listed, why = parse_attributes(g.text, cfg.max_attributes)
        listed_by_item[todo[i]["iid"]] = (listed, g.text, why)
    attrs = [listed_by_item[t["iid"]] for t in todo]
    orig_asks = [(i, a) for i in owners for a in listed_by_item[todo[i]["iid"]][0]]
    p_orig_flat = vlm.p_yes([todo[i]["original_cut"] for i, _ in orig_asks],
                            [render(sections["attribute_present"], attribute=a) for _, a in orig_asks],
                            batch_size=cfg.batch_size)
    p_orig_by_item: dict[str, list[float]] = {todo[i]["iid"]: [] for i in owners}
    for (i, _), po in zip(orig_asks, p_orig_flat):
        p_orig_by_item[todo[i]["iid"]].append(float(po))
    asks = [(i, a) for i, (listed, _, _) in enumerate(attrs) for a in listed]
    p_edit = vlm.p_yes([todo[i]["edited_cut"] for i, _ in asks],
                       [render(sections["attribute_present"], attribute=a) for _, a in asks], batch_size=cfg.batch_size)
    per_pair = [(list(p_orig_by_item[t["iid"]]), []) for t in todo]
    for (i, _), pe in zip(asks, p_edit):
        per_pair[i][1].append(float(pe))
    return attrs, per_pair


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
    return check_rows(rows.select(["item_id", "candidate"]), meta.column("prompt").to_pylist(),
                      meta.column("instructions").to_pylist(), images, cfg, lambda: load_vlm(cfg, profile.models_root))


STAGE = Stage(name="check", version="1", section="filter", reads=("cutout", "sample", "edit", "instruct"),
              compute=compute, key_extra=lambda p: template_hash(p.filter.template), config_view=checking_view)
