"""Control detectors with annotator networks (richpref/models/editor.py): random weights in the
lllyasviel/Annotators layout load from its directory or file, the HED map follows the content,
errors name the problem, and a ControlNet edit steered by a network control."""
from __future__ import annotations

import numpy as np
import pytest

from image_helpers import EDIT, _arr, _scene
from richpref.models.editor import ANNOTATOR_FILES, ControlDetector, ControlNetEditor, annotator_network
from richpref.models.runtime import ModelNotAvailable
from richpref.models.tiny.diffusion import build_random_annotator


@pytest.fixture(scope="module")
def annotators(tmp_path_factory):
    """Random annotator weights in the lllyasviel/Annotators layout, one directory for all kinds."""
    root = tmp_path_factory.mktemp("annotators")
    for kind in ANNOTATOR_FILES:
        build_random_annotator(kind, root, seed=0)
    return root


@pytest.mark.parametrize("kind", sorted(ANNOTATOR_FILES))
def test_annotator_loads_from_the_annotators_layout(kind, annotators):
    img = _scene((70, 50))
    loaded = ControlDetector.load(kind, annotators)
    # The same seeded network handed over directly gives the same map: the file round-trips.
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        direct = ControlDetector(kind, annotator_network(kind))
    a, b = loaded(img), direct(img)
    assert a.size == img.size and a.mode == "RGB"
    assert np.array_equal(_arr(a), _arr(b))
    # The file itself works as well as its directory.
    assert np.array_equal(_arr(ControlDetector.load(kind, annotators / ANNOTATOR_FILES[kind])(img)), _arr(a))


def test_hed_map_follows_content(annotators):
    hed = ControlDetector.load("softedge_hed", annotators)
    scene = _arr(hed(_scene()))
    shifted = _arr(hed(_scene(fg=(20, 220, 120))))
    assert scene.std() > 5.0  # not a constant map
    assert np.abs(scene - shifted).mean() > 1.0


def test_annotator_errors_name_the_problem(annotators, tmp_path):
    with pytest.raises(ValueError, match="edit.control_weights.*ControlNetHED.pth"):
        ControlDetector("softedge_hed")
    with pytest.raises(ModelNotAvailable, match=r"table5_pidinet.pth"):
        ControlDetector.load("softedge_pidi", tmp_path)
    with pytest.raises(ValueError, match="does not hold 'lineart'"):
        ControlDetector.load("lineart", annotators / ANNOTATOR_FILES["softedge_pidi"])
    with pytest.raises(ValueError, match="unknown control kind"):
        ControlDetector("depth")


def test_edit_with_a_network_control(paths, annotators):
    editor = ControlNetEditor.load(str(paths.sd15), str(paths.controlnet), device="cpu",
                                   control="softedge_hed", control_weights=str(annotators))
    try:
        assert editor.detector.kind == "softedge_hed"
        img = _scene()
        hed = editor.edit([img], ["a ball"], [5], **EDIT)[0]
        canny = editor.edit([img], ["a ball"], [5], control="canny", **EDIT)[0]
        assert hed.size == img.size
        assert np.abs(_arr(hed) - _arr(canny)).mean() > 0.5
    finally:
        editor.close()
