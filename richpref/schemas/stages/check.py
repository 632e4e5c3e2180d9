"""The `check:` section: the check stage's VLM and the questions it asks about each (original, edit) pair.

All of it is the check stage's content key (less the runtime-only fields): the thresholds that turn
the answers into keep/drop are the `filter:` section's, so tuning one asks the VLM nothing again.
"""
from __future__ import annotations

from pydantic import Field

from ..vlm import VLMStageConfig


class CheckConfig(VLMStageConfig):
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    template: str = "filter_v2"
    max_new_tokens: int = Field(64, ge=1)  # for the attribute list
    # UPER §3.2.1 attribute check: the VLM lists up to max_attributes key attributes of the subject in
    # the original cut-out, then is asked whether each is present in the original and in the edit
    # (the filter's min_attribute_present / min_attributes_kept judge the answers). false: not asked.
    attributes: bool = True
    max_attributes: int = Field(5, ge=1)
    # In-process: the questions about one image run on one cached image+prompt prefix (the image is
    # encoded once per pair and image); same probabilities up to float noise, so not in the key.
    share_image_prefix: bool = True
