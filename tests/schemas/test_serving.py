"""The serving settings of a VLM stage (richpref/schemas/serving.py): what of `engine:` and `image:` is
in a stage's content key, and the image caps applied before either backend sees an image."""
from __future__ import annotations

import numpy as np
import pytest

from richpref.schemas.config import CritiqueConfig
from richpref.schemas.serving import EngineConfig
from vlm_helpers import image


def test_content_key_leaves_out_the_endpoint_and_client_settings():
    from richpref.schemas.config import config_hash

    base = CritiqueConfig()
    a = CritiqueConfig(engine=EngineConfig(backend="server", endpoint="http://10.0.0.1:8000/v1"))
    b = CritiqueConfig(engine=EngineConfig(backend="server", launch="vllm", concurrency=3, retries=0))
    assert config_hash(a) == config_hash(b) != config_hash(base)
    capped = CritiqueConfig(image={"max_pixels": 1000})
    assert config_hash(capped) != config_hash(base)
    from richpref.schemas.serving import key_view

    # At the defaults, neither block is in the key: profiles written before they existed keep theirs.
    keyed = key_view(base, base.model_dump(mode="json"))
    assert "engine" not in keyed and "image" not in keyed


def test_image_caps_resize_before_either_backend():
    from richpref.schemas.serving import ImageCaps

    img = image(1, (200, 100))
    capped = ImageCaps(max_pixels=5000).apply(img)
    assert capped.size[0] * capped.size[1] <= 5000 and abs(capped.size[0] / capped.size[1] - 2) < 0.05
    assert ImageCaps(min_pixels=100, max_pixels=10**6).apply(img) is img
    with pytest.raises(ValueError):
        ImageCaps(min_pixels=10, max_pixels=5)
    assert np.asarray(ImageCaps(min_pixels=40000).apply(img)).shape[:2] == (141, 282)


def test_only_a_server_someone_else_runs_holds_the_weights_elsewhere():
    """The one rule the doctor, the score stage, the reward and judge loaders and the VLM client follow:
    at an endpoint the weights are not looked for here; launched or in-process they are."""
    assert EngineConfig(backend="server", endpoint="http://10.0.0.1:8000/v1").weights_elsewhere
    assert not EngineConfig(backend="server", launch="vllm").weights_elsewhere
    assert not EngineConfig().weights_elsewhere
