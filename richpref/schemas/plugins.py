"""What the plug-in registries share (reward kinds: schemas/rewards/, editor kinds: schemas/editor_kinds/,
VLM engines: schemas/vlm_engines/):
finding the declarations in a package, and a plug-in's tiny random-weight twin."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class TinyTwin:
    """A plug-in's tiny random-weight twin: `key` names it in richpref.models.tiny.LAYOUT (`paths.<key>` in
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


def discover(package: str, path: Iterable[str], what: str) -> dict[str, Any]:
    """Every declaration in the `KINDS` tuples of `package`'s modules (module order), keyed by `.kind`."""
    kinds: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{info.name}")
        for decl in getattr(module, "KINDS", ()):
            if decl.kind in kinds:
                raise RuntimeError(f"{what} {decl.kind!r} declared twice ({package}.{info.name})")
            kinds[decl.kind] = decl
    return kinds
