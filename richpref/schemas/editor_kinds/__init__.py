"""The editor kinds (`edit.kind`): one declaration per kind, found by walking this package.

Each module declares one editor of richpref/models/editors (same file name) as
`KINDS = (EditorDecl(...),)`: its kind, the settings it takes with their defaults (the real
checkpoint's recommended values), its class (`module:Class` of richpref/models/editors) and its tiny
twin(s). The config's allowed kinds and settings (richpref/schemas/editors.py), the editor table
(richpref/models/editor.py) and the tiny models' layout are read from `EDITOR_KINDS`.

Adding an editor: its class (richpref/models/editors/<kind>.py), its declaration here
(richpref/schemas/editor_kinds/<kind>.py) and its tiny twin's builder (richpref/models/tiny/editors.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..plugins import TinyTwin, discover

__all__ = ["EDITOR_KINDS", "EDITOR_NAMES", "EditorDecl", "TinyTwin"]


@dataclass(frozen=True)
class EditorDecl:
    kind: str
    editor: str  # `module:Class` of richpref.models.editors
    defaults: Mapping[str, Any]  # every setting it takes (edit.<name>) and its default
    tiny: tuple[TinyTwin, ...] = ()


EDITOR_KINDS: dict[str, EditorDecl] = discover(__name__, __path__, "editor kind")
EDITOR_NAMES: tuple[str, ...] = tuple(EDITOR_KINDS)
