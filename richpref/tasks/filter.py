"""filter: keep or drop each (original, edited) pair from the check stage's VLM answers; no model call.

Each check against its threshold (UPER §3.2.1 and the failure modes of RPO appendix D):

- executed: the per-instruction P(yes) reduced by mean or min (`executed_reduce`) >= `min_executed`;
- no_stray: P(yes) >= `min_no_stray`;
- subject_kept: P(yes) >= `min_subject_kept`;
- attributes: of the listed attributes present in the original (P >= `min_attribute_present`) and not
  named by an instruction, at least `min_attributes_kept` must still be present in the edit (when
  `check.attributes` asked about them).

`reason` lists every failed check as `code: detail`; `checks` holds every check's outcome as JSON.
Changing a threshold (the `filter:` section) recomputes this stage only: the VLM's answers are the
check stage's (the `check:` section).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from ..schemas.config import CheckConfig, FilterConfig, Profile
from ..schemas.tables import OK, VERDICTS, rows_to_table
from .base import Stage, StageInputs, kept, rejected
from .check import check_rows, load_filter_template, parse_attributes  # noqa: F401
from .vlm_text import content_words

# check name -> reject code when it fails
FAIL_CODES = {"executed": "not_executed", "no_stray": "stray_content", "subject_kept": "subject_changed",
              "attributes": "attributes_lost"}


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
    return exempt, share, (f"fail: {below(share, cfg.min_attributes_kept, 2)} of {len(checked)} attributes kept "
                           f"(< filter.min_attributes_kept={cfg.min_attributes_kept}); lost {named}")


def threshold_outcome(p: float, minimum: float, field: str) -> str:
    return "pass" if p >= minimum else f"fail: P(yes)={below(p, minimum)} < filter.{field}={minimum}"


def below(p: float, minimum: float, digits: int = 3) -> str:
    """p with `digits` decimals, or as many more as it takes to read as less than `minimum` (0.52196
    against 0.522 is 0.52196, not 0.522)."""
    for digits in range(digits, 10):
        text = f"{p:.{digits}f}"
        if float(text) < minimum:
            return text
    return repr(p)


def decide_rows(checks: pa.Table, instructions: list, cfg: FilterConfig, attributes_asked: bool = True) -> pa.Table:
    """One verdict per row of the check stage's answers (`instructions` per row, for the attribute
    exemption); rows the check stage rejected stay rejected. `attributes_asked`: the check stage's
    `check.attributes` (its key is among this stage's inputs' keys)."""
    out = []
    for r, ins in zip(checks.to_pylist(), instructions):
        if r["status"] != OK:
            out.append(rejected(r["item_id"], r["reason"], candidate=r["candidate"], verdict="drop", template=r["template"],
                                model_id=r["model_id"], p_source=r.get("p_source")))
            continue
        each = list(r["p_executed_each"] or [])
        p_exec = float(min(each) if cfg.executed_reduce == "min" else np.mean(each)) if each else 0.0
        checks = {
            "executed": threshold_outcome(p_exec, cfg.min_executed, "min_executed") if each
            else "fail: the pair has no instruction",
            "no_stray": threshold_outcome(r["p_no_stray"], cfg.min_no_stray, "min_no_stray"),
            "subject_kept": threshold_outcome(r["p_subject_kept"], cfg.min_subject_kept, "min_subject_kept"),
        }
        values = {k: r[k] for k in ("candidate", "p_no_stray", "p_subject_kept", "template", "model_id")}
        values.update(p_executed=p_exec, p_executed_each=each, p_source=r.get("p_source"))  # where P(yes) came from
        if cfg.min_attributes_kept <= 0:
            checks["attributes"] = "skipped: filter.min_attributes_kept=0"
        elif not attributes_asked:
            checks["attributes"] = "skipped: check.attributes=false"
        elif r["attributes"] is None:
            raise ValueError(f"filter: the check stage's answers for {r['item_id']} have no attributes; it ran with "
                             "check.attributes=false (rerun with the same setting, or let the check stage recompute)")
        else:
            listed, why = list(r["attributes"]), r["attributes_error"]
            p_orig, p_edit = list(r["p_attr_original"] or []), list(r["p_attr_edited"] or [])
            if why:
                exempt, share = [], None
                checks["attributes"] = ("fail: " if cfg.on_no_attributes == "drop" else "skipped: ") + why
            else:
                exempt, share, checks["attributes"] = attribute_check(listed, p_orig, p_edit, list(ins or []), cfg)
            values.update(attributes=listed, attributes_raw=r["attributes_raw"], p_attr_original=p_orig,
                          p_attr_edited=p_edit, attr_exempt=exempt, attributes_kept=share)
        failed = [f"{FAIL_CODES[name]}: {outcome[len('fail: '):]}" for name, outcome in checks.items()
                  if outcome.startswith("fail")]
        values["checks"] = json.dumps(checks, sort_keys=True)
        out.append(rejected(r["item_id"], "; ".join(failed), verdict="drop", **values) if failed
                   else kept(r["item_id"], verdict="keep", **values))
    return rows_to_table(out, VERDICTS)


def filter_rows(rows: pa.Table, prompts: list, instructions: list, images: dict[str, list], check: CheckConfig,
                cfg: FilterConfig, get_vlm) -> pa.Table:
    """Ask (model calls) and decide in one go: one verdict per row of `rows` (item_id, candidate)."""
    return decide_rows(check_rows(rows, prompts, instructions, images, check, get_vlm), instructions, cfg,
                       check.attributes)


def compute(inputs: StageInputs, profile: Profile) -> pa.Table:
    instructions = inputs.lookup("instruct", ["instructions"]).column("instructions").to_pylist()
    return decide_rows(inputs.rows, instructions, profile.filter, profile.check.attributes)


STAGE = Stage(name="filter", version="6", section="filter", reads=("check", "instruct"), compute=compute,
              loads_model=False, schema=VERDICTS)
