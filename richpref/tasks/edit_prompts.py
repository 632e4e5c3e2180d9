"""The edit prompt, and which instructions of it reach the editor's text encoders.

The edit prompt is "prompt, instruction 1, ..., instruction k" (`edit.joiner`). A CLIP encoder reads
77 tokens (start and end included) and silently cuts the rest, so the later instructions of a long
prompt never reach the editor; asking the VLM whether they were executed then judges the edit on
what it was never told. Every tokenizer of the editor's encoders counts the prompt (CLIP for SD 1.5,
both CLIPs for SDXL; T5's 512 for FLUX.1 Kontext, Qwen2.5-VL's 512 for Qwen-Image-Edit), and
`edit.long_prompt` says what happens past a limit:

- `cap` (default): the prompt keeps the leading instructions that fit every encoder whole; the
  others are dropped from it and recorded (`dropped_instructions`, with `prompt_note` saying why);
- `truncate`: the whole prompt is given and the encoder cuts it, as the pipelines do; the
  instructions past the cut are recorded the same way.

Either way `edit_instructions` lists the instructions that reached the editor, and the check stage
asks only about those. A row where not even the first instruction fits is rejected
(`prompt_too_long`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..schemas.config import EditConfig

Counter = Callable[[str], list[tuple[str, int, int]]]  # text -> (tokenizer, tokens, limit) per encoder


def edit_prompt(prompt: str, instructions: list[str], cfg: EditConfig) -> str:
    """The edit's text prompt: the original prompt and the instructions joined with `edit.joiner`
    (RPO), or the instructions alone (`prompt_mode: instructions_only`, the paper's ablation)."""
    steps = [s for s in instructions if s and s.strip()]
    return cfg.joiner.join(steps if cfg.prompt_mode == "instructions_only" else [prompt, *steps])


@dataclass
class FittedPrompt:
    text: str
    used: list[str]
    dropped: list[str] = field(default_factory=list)
    note: str | None = None  # why instructions were dropped (`code: detail`)
    reject: str | None = None  # set when no instruction reaches the editor


def _over(counts: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    return [c for c in counts if c[1] > c[2]]


def fit_prompt(prompt: str, instructions: list[str], cfg: EditConfig, count: Counter) -> FittedPrompt:
    """The edit prompt under `cfg.long_prompt`, with the instructions that reach the editor."""
    steps = [s for s in instructions if s and s.strip()]
    full = edit_prompt(prompt, steps, cfg)
    over = _over(count(full))
    if not over:
        return FittedPrompt(full, steps)
    fits = 0
    while fits < len(steps) and not _over(count(edit_prompt(prompt, steps[: fits + 1], cfg))):
        fits += 1
    where = ", ".join(f"{name} reads {limit} tokens, the whole prompt has {n}" for name, n, limit in over)
    if fits == 0:
        return FittedPrompt(full, [], steps, reject=f"prompt_too_long: no instruction fits the text encoder ({where})")
    kept, dropped = steps[:fits], steps[fits:]
    what = f"instruction{'s' if len(dropped) > 1 else ''} {fits + 1}..{len(steps)}" if len(dropped) > 1 else \
        f"instruction {fits + 1}"
    if cfg.long_prompt == "cap":
        return FittedPrompt(edit_prompt(prompt, kept, cfg), kept, dropped,
                            f"over_token_limit: {what} left out of the prompt ({where})")
    return FittedPrompt(full, kept, dropped, f"cut_by_encoder: {what} past the encoder's cut ({where})")
