"""The `filter:` section: the filter stage's thresholds on the check stage's answers; no model, no key of check's."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..common import _Strict


class FilterConfig(_Strict):
    min_executed: float = Field(0.5, ge=0, le=1)
    executed_reduce: Literal["mean", "min"] = "mean"  # over the per-instruction P(yes)
    min_no_stray: float = Field(0.5, ge=0, le=1)
    min_subject_kept: float = Field(0.5, ge=0, le=1)
    # UPER §3.2.1 attribute check (when `check.attributes` asked the questions): an attribute counts as
    # present where P(yes) >= min_attribute_present. Of the attributes present in the original, at least
    # min_attributes_kept (a share) must be present in the edit; 0 turns the check off. Attributes the
    # instructions name are expected to change and are exempt.
    min_attribute_present: float = Field(0.5, ge=0, le=1)
    min_attributes_kept: float = Field(0.8, ge=0, le=1)
    exempt_instructed_attributes: bool = True
    on_no_attributes: Literal["keep", "drop"] = "keep"  # when no listed attribute is present in the original
