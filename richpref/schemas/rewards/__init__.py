"""The reward kinds: one declaration per kind, found by walking this package.

Each module here declares the kinds of one scorer module of richpref/models/rewards (same file name)
as `KINDS = (RewardKind(...), ...)`: the kind's name, the options a profile may set for it and what an
unset one means, how to load it (a `module:callable` of richpref/models/rewards, imported only when a
profile scores with it) and its tiny random-weight twin (a builder of richpref/models/tiny). The
config's allowed kinds (`relabel.rewards.*.kind`), the options each takes, the loader table and the
tiny models' layout are all read from `REWARD_KINDS`; nothing else lists the kinds.

Adding a reward: its scorer (richpref/models/rewards/<kind>.py), its declaration here
(richpref/schemas/rewards/<kind>.py) and its tiny twin's builder (richpref/models/tiny/<family>.py).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class TinyTwin:
    """A reward's tiny random-weight twin: `key` names it in richpref.models.tiny.LAYOUT (`paths.<key>` in
    tests). `build` (`module:function` of richpref/models/tiny) is called as
    `function(<root>/<folder>, *(<root>/<LAYOUT[n]> for n in needs), *args, seed=<build seed> + seed)`;
    empty when the twin is a model the tiny set builds anyway (the tiny CLIP, the tiny Qwen2.5-VL)."""

    key: str
    folder: str = ""  # under the tiny models root; default: key
    build: str = ""
    seed: int = 0
    needs: tuple[str, ...] = ()  # tiny models it is built on (their LAYOUT keys), built before it
    args: tuple[Any, ...] = ()

    @property
    def path(self) -> str:
        return self.folder or self.key


@dataclass(frozen=True)
class RewardKind:
    kind: str
    loader: str  # `module:callable` of richpref.models.rewards: callable(path, device=, dtype=, **options, **fixed)
    options: tuple[str, ...] = ()  # the profile options it passes to the loader (besides model, weight, on_cutout)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # what an unset option means (the loader's default)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # loader arguments no profile sets (clip vs pickscore)
    on_cutout: bool = True  # whether it may score the foreground cut-outs
    pairwise: bool = False  # scores (original, edit) together, not each image
    reads_instruction: bool = False  # reads each edit's instructions (the edit stage's)
    edit_gate: bool = False  # its score may gate edits (`relabel.edit_gate`)
    tiny: TinyTwin | None = None

    @property
    def allowed(self) -> frozenset[str]:
        """Every option a profile may set for it besides kind, model and weight."""
        return frozenset(self.options) | ({"on_cutout"} if self.on_cutout else frozenset())


def _discover() -> dict[str, RewardKind]:
    kinds: dict[str, RewardKind] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for decl in getattr(module, "KINDS", ()):
            if decl.kind in kinds:
                raise RuntimeError(f"reward kind {decl.kind!r} declared twice (richpref/schemas/rewards/{info.name}.py)")
            kinds[decl.kind] = decl
    return kinds


REWARD_KINDS: dict[str, RewardKind] = _discover()
KIND_NAMES: tuple[str, ...] = tuple(REWARD_KINDS)
