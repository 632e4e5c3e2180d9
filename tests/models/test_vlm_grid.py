"""image.max_tiles: LLaVA-OneVision's anyres grid capped, in-process and for a launched server."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from richpref.models.vlm import VisionLanguageModel
from richpref.models.vlm_grid import NotAnAnyresModel, capped_model_dir, capped_pinpoints
from richpref.schemas.config import CritiqueConfig, config_hash
from richpref.schemas.serving import EngineConfig, ImageCaps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "Describe how this image misses the prompt: a red apple."


def picture(size=(112, 112)) -> Image.Image:
    rng = np.random.RandomState(3)
    return Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def image_tokens(vlm: VisionLanguageModel, img: Image.Image) -> int:
    ids = vlm._encode([img], [PROMPT])["input_ids"]
    return int((ids == vlm.model.config.image_token_index).sum())


def test_capped_pinpoints_by_hand():
    grid = [[384, 384], [384, 768], [768, 384], [768, 768], [1152, 768], [1152, 1152]]
    assert capped_pinpoints(grid, 384, 1) == [[384, 384]]
    assert capped_pinpoints(grid, 384, 2) == [[384, 384], [384, 768], [768, 384]]
    assert capped_pinpoints(grid, 384, 6) == grid[:5]  # 3x2 = 6 tiles kept, 3x3 = 9 dropped
    with pytest.raises(ValueError, match="smallest has 4 tiles"):
        capped_pinpoints(grid[3:], 384, 2)


def test_the_cap_is_in_the_key_and_an_unset_cap_leaves_old_keys_alone():
    base = CritiqueConfig()
    assert ImageCaps().key_data() is None
    assert ImageCaps(max_pixels=1000).key_data() == {"min_pixels": None, "max_pixels": 1000}
    assert config_hash(CritiqueConfig(image={"max_tiles": 2})) not in {
        config_hash(base), config_hash(CritiqueConfig(image={"max_tiles": 3}))}


@pytest.fixture(scope="module")
def llava(tiny_models):
    return str(tiny_models / "llava-critic")


def test_in_process_cap_spends_fewer_image_tokens_and_still_generates(llava):
    img = picture()  # 112x112: the uncapped grid picks 2x2 tiles of 56 px
    with VisionLanguageModel.load(llava, device="cpu") as full:
        uncapped = image_tokens(full, img)
    with VisionLanguageModel.load(llava, device="cpu", image_caps=ImageCaps(max_tiles=2)) as capped:
        assert capped.model.config.image_grid_pinpoints == [[56, 56], [56, 112], [112, 56]]
        fewer = image_tokens(capped, img)
        # The model's feature count must agree with the processor's placeholders, or generate fails.
        text = capped.generate([img], [PROMPT], max_new_tokens=4)
    assert fewer < uncapped
    assert len(text) == 1


def test_a_launched_server_reads_the_capped_grid_from_an_overlay(llava, tmp_path):
    overlay = capped_model_dir(llava, 2, root=tmp_path)
    assert capped_model_dir(llava, 2, root=tmp_path) == overlay  # reused, not rebuilt
    for name in ("config.json", "processor_config.json"):
        text = (overlay / name).read_text()
        assert not (overlay / name).is_symlink() and "[112, 112]" not in json.dumps(json.loads(text))
    assert (overlay / "model.safetensors").is_symlink()
    img = picture()
    # The overlay is what a server loads: loaded plainly, it spends what the in-process cap spends.
    with VisionLanguageModel.load(str(overlay), device="cpu") as served_view, \
            VisionLanguageModel.load(llava, device="cpu", image_caps=ImageCaps(max_tiles=2)) as capped:
        assert image_tokens(served_view, img) == image_tokens(capped, img)
        assert served_view.generate([img], [PROMPT], max_new_tokens=6) == capped.generate([img], [PROMPT], max_new_tokens=6)


def test_a_model_without_a_grid_or_a_server_richpref_does_not_start_is_refused(tiny_models):
    with pytest.raises(NotAnAnyresModel, match="image.max_pixels"):
        VisionLanguageModel.load(str(tiny_models / "qwen2.5-vl"), device="cpu", image_caps=ImageCaps(max_tiles=2))
    from richpref.models.vlm_client import connect

    engine = EngineConfig(backend="server", endpoint="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="does not start"):
        connect(engine, str(tiny_models / "llava-critic"), image_caps=ImageCaps(max_tiles=2))
