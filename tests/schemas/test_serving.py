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


def test_image_caps_leave_an_image_at_either_bound_alone_and_never_go_under_one_pixel():
    from richpref.schemas.serving import ImageCaps

    img = image(1, (200, 100))
    assert ImageCaps(max_pixels=20_000).apply(img) is img and ImageCaps(min_pixels=20_000).apply(img) is img
    assert ImageCaps(max_pixels=10).apply(image(2, (400, 20))).size == (14, 1)  # 0.7 px high: one
    assert ImageCaps(max_pixels=10).apply(image(2, (20, 400))).size == (1, 14)


def test_max_tiles_is_in_the_key_only_when_set():
    from richpref.schemas.serving import ImageCaps

    assert ImageCaps().key_data() is None and ImageCaps(max_pixels=1000).key_data() == {"max_pixels": 1000, "min_pixels": None}
    assert ImageCaps(max_tiles=4).key_data() == {"max_pixels": None, "min_pixels": None, "max_tiles": 4}


def test_a_launcher_enters_the_key_of_a_stage_that_reads_probabilities_where_it_changes_them():
    """transformers serve answers 0/1, vLLM and SGLang give probabilities; in-process and at an
    endpoint nothing is added, so their keys stay."""
    from richpref.schemas.config import CheckConfig
    from richpref.tasks.check import checking_view

    def answers(**engine):
        return checking_view(CheckConfig(engine=EngineConfig(**engine) if engine else EngineConfig())).get("answers")

    assert answers() is None and answers(backend="server", endpoint="http://10.0.0.1:8000/v1") is None
    assert answers(backend="server", launch="vllm") == {"launch": "vllm"}
    assert answers(backend="server", launch="transformers") == {"launch": "transformers"}


def test_a_launcher_that_cannot_serve_the_stage_is_refused_naming_the_fix():
    from richpref.schemas.serving import check_launcher

    chat, judge = EngineConfig(backend="server", launch="vllm"), EngineConfig(backend="server", launch="richpref")
    check_launcher(chat, "critique", head_judge=False)
    check_launcher(judge, "reward kind 'hpsv3'", head_judge=True)
    check_launcher(EngineConfig(), "critique", head_judge=False)
    with pytest.raises(ValueError, match=r"critique: engine.launch=richpref serves the head judges .* only; use one "
                                         r"of vllm, sglang, transformers"):
        check_launcher(judge, "critique", head_judge=False)
    with pytest.raises(ValueError, match=r"reward kind 'hpsv3': engine.launch=vllm serves chat answers, not a reward "
                                         r"head's value; use engine.launch: richpref"):
        check_launcher(chat, "reward kind 'hpsv3'", head_judge=True)
    with pytest.raises(ValueError, match="serves the head judges"):
        CritiqueConfig(engine=judge)
