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
            each = executed_each[i]
            p_exec = float(min(each) if cfg.executed_reduce == "min" else np.mean(each)) if each else 0.0
            checks = {
                "executed": threshold_outcome(p_exec, cfg.min_executed, "min_executed") if each
                else "fail: the pair has no instruction",
                "no_stray": threshold_outcome(float(no_stray[i]), cfg.min_no_stray, "min_no_stray"),
                "subject_kept": threshold_outcome(float(subject[i]), cfg.min_subject_kept, "min_subject_kept"),
            }
            values = dict(candidate=cands[t["k"]], p_executed=p_exec, p_no_stray=float(no_stray[i]), p_subject_kept=float(subject[i]),
                          p_executed_each=each, template=cfg.template, model_id=vlm.model_id)
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
    return filter_rows(rows.select(["item_id", "candidate"]), meta.column("prompt").to_pylist(),
                       meta.column("instructions").to_pylist(), images, cfg,
                       lambda: load_vlm(cfg, profile.models_root))


STAGE = Stage(name="filter", version="3", section="filter", reads=("cutout", "sample", "edit", "instruct"),
              compute=compute, key_extra=lambda p: template_hash(p.filter.template))
