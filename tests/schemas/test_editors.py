"""One declaration per editor kind (richpref/schemas/editor_kinds/): the config's allowed kinds and
settings, the editor table and the tiny editors' layout come from it, and no other module lists the kinds."""
from __future__ import annotations

import typing

import pytest

from richpref.schemas.editor_kinds import EDITOR_KINDS
from test_plugins import ROOT, literal_lists


def test_the_config_allows_exactly_the_declared_editors():
    from pydantic import ValidationError

    from richpref.schemas.editors import EDITOR_DEFAULTS, EditorSettings

    assert typing.get_args(EditorSettings.model_fields["kind"].annotation) == tuple(EDITOR_KINDS)
    assert EDITOR_DEFAULTS == {k: dict(d.defaults) for k, d in EDITOR_KINDS.items()}
    with pytest.raises(ValidationError) as err:
        EditorSettings(kind="pix2pix")
    assert all(f"'{k}'" in str(err.value) for k in EDITOR_KINDS)
    for kind, decl in EDITOR_KINDS.items():  # an unset setting takes the declared default
        settings = EditorSettings(kind=kind)
        assert {name: getattr(settings, name) for name in decl.defaults} == dict(decl.defaults)


def test_the_editor_table_is_the_declarations(paths):
    from richpref.models.editor import EDITORS
    from richpref.models.tiny import LAYOUT

    assert list(EDITORS) == list(EDITOR_KINDS)
    for kind, decl in EDITOR_KINDS.items():
        assert EDITORS[kind].kind == kind
        assert set(EDITORS[kind].SETTINGS) <= set(decl.defaults) | {"resolution"}, kind  # what `edit` is passed
        assert decl.tiny, f"{kind} has no tiny twin"
        for twin in decl.tiny:
            assert (paths.root / LAYOUT[twin.key]).is_dir(), twin.key


def test_no_module_lists_the_editor_kinds_by_hand():
    decls = ROOT / "richpref" / "schemas" / "editor_kinds"
    found = {str(p.relative_to(ROOT)): lines for p in sorted((ROOT / "richpref").rglob("*.py"))
             if decls not in p.parents and (lines := literal_lists(p, set(EDITOR_KINDS)))}
    assert not found, f"editor kinds listed outside richpref/schemas/editor_kinds/: {found}"


def test_settings_of_another_editor_are_refused_naming_them_and_how_to_switch():
    from richpref.schemas.config import ProfileError, load_profile

    # the tiny profile's ControlNet settings do not carry over to another kind set on the command line
    with pytest.raises(ProfileError) as err:
        load_profile("tiny", ["edit.kind=instruct_pix2pix"])
    message = str(err.value)
    assert message.splitlines()[0].endswith("tiny.yaml with its --set values is invalid:")  # not the file alone
    assert "edit (--set edit.kind=instruct_pix2pix): edit.kind 'instruct_pix2pix' takes no controlnet, control, " \
           "strength (controlnet is for controlnet_img2img" in message
    assert "--set 'edit={kind: instruct_pix2pix, model: ...}'" in message
    switched = load_profile("tiny", ["edit={kind: instruct_pix2pix, model: instruct-pix2pix}"])
    assert switched.edit.kind == "instruct_pix2pix" and switched.edit.strength is None
    assert switched.edit.image_guidance_scale == EDITOR_KINDS["instruct_pix2pix"].defaults["image_guidance_scale"]
