"""The editor part of the edit stage's config: `edit.kind` and each kind's own settings.

`model`, `steps` and `guidance_scale` belong to every kind (with a default per kind); the others to
one or two kinds. A setting given for a kind that does not take it is a config error, so a
ControlNet `strength` left in a profile switched to `flux_kontext` fails before any model loads
instead of being silently ignored. Settings left out take the kind's default.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .editor_kinds import EDITOR_KINDS, EDITOR_NAMES

EditorKind = Literal[EDITOR_NAMES]  # every kind declared in richpref/schemas/editor_kinds/
ControlKind = Literal["canny", "tile", "lineart_standard", "softedge_hed", "softedge_pidi", "lineart"]

# Each kind's settings and their defaults (the real checkpoints' recommended values): its declaration.
EDITOR_DEFAULTS: dict[str, dict[str, Any]] = {k: dict(d.defaults) for k, d in EDITOR_KINDS.items()}
EDITOR_FIELDS = ("model", "controlnet", "control", "control_weights", "strength", "guidance_scale",
                 "conditioning_scale", "image_guidance_scale", "steps", "max_area", "negative_prompt")

PROMPT_MODE_ALIASES = {"prompt+instructions": "prompt_plus_instructions", "instructions": "instructions_only"}


def _prompt_mode_alias(value: Any) -> Any:
    return PROMPT_MODE_ALIASES.get(value, value) if isinstance(value, str) else value


# The original prompt, then the instructions (RPO); or the instructions alone (RPO appendix B's
# ablation). The spellings of earlier releases are accepted.
PromptMode = Annotated[Literal["prompt_plus_instructions", "instructions_only"], BeforeValidator(_prompt_mode_alias)]


class EditorSettings(BaseModel):
    """`edit.kind` and the editor settings; see EDITOR_DEFAULTS for which kind takes which."""

    model_config = ConfigDict(extra="forbid")

    kind: EditorKind = "controlnet_img2img"
    model: str | None = None  # Hub id or a folder (relative to models_root)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    # controlnet_img2img
    controlnet: str | None = None
    control: ControlKind | None = None
    # Annotator weights for the network controls (softedge_*, lineart): a directory in the
    # lllyasviel/Annotators layout (local, relative to models_root, or a cached Hub id) or the file.
    control_weights: str | None = None
    strength: float | None = Field(None, gt=0, le=1)
    conditioning_scale: float | None = None
    # instruct_pix2pix: pull toward the original image (1 = off)
    image_guidance_scale: float | None = Field(None, ge=0)
    # flux_kontext, qwen_image_edit: working resolution in pixels (the input's aspect ratio kept)
    max_area: int | None = Field(None, ge=32 * 32)
    negative_prompt: str | None = None  # qwen_image_edit: the classifier-free guidance's negative prompt
    # The size every kind edits at: "native" (the checkpoint's own: SD 1.5 512², SDXL 1024²,
    # sdxl-instructpix2pix-768 768², Kontext's preferred resolutions, Qwen-Image-Edit max_area; the
    # input's aspect ratio kept, sides multiples of what the model takes), "keep" (the input's size,
    # snapped to those multiples) or N (about N x N pixels). Edits are stored at that size.
    resolution: Literal["native", "keep"] | Annotated[int, Field(ge=64, le=4096)] = "native"

    @model_validator(mode="after")
    def _settings_fit_kind(self) -> "EditorSettings":
        own = EDITOR_DEFAULTS[self.kind]
        stray = [f for f in EDITOR_FIELDS if f not in own and getattr(self, f) is not None]
        if stray:
            takers = {f: [k for k, d in EDITOR_DEFAULTS.items() if f in d] for f in stray}
            where = "; ".join(f"{f} is for {', '.join(ks)}" for f, ks in takers.items())
            raise ValueError(f"edit.kind {self.kind!r} takes no {', '.join(stray)} ({where}); remove "
                             f"{'them' if len(stray) > 1 else 'it'}, or on the command line give the whole section: "
                             f"--set 'edit={{kind: {self.kind}, model: ...}}'. Settings of {self.kind}: "
                             f"{', '.join(sorted(own))}")
        for name, default in own.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        return self
