"""In-process prefix sharing: the questions about one image encode it once and run in batches on top
of its cached prefix, with the probabilities `VisionLanguageModel.p_yes` gives each full prompt."""
from __future__ import annotations

import numpy as np
import pytest

from richpref.models import vlm_prefix
from richpref.models.vlm import VisionLanguageModel
from vlm_helpers import image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Questions of different lengths, so a batch pads its shorter ones.
QUESTIONS = [f"Does the image show {w}? Answer yes or no." for w in
             ("a dog", "a red car parked beside a tall green tree", "an apple", "it", "two blue birds on a wire")]


@pytest.fixture(scope="module")
def local(tiny_models):
    out = {name: VisionLanguageModel.load(str(tiny_models / folder), device="cpu")
           for name, folder in (("critic", "llava-critic"), ("qwen", "qwen2.5-vl"))}
    yield out
    for m in out.values():
        m.close()


@pytest.mark.parametrize("batch_size", [1, 2, 5, 8])
@pytest.mark.parametrize("name", ["qwen", "critic"])
def test_questions_about_one_image_share_its_encoding_and_run_in_batches(local, name, batch_size):
    vlm, img = local[name], image(5, (48, 64))
    before = dict(vlm_prefix.STATS)
    shared = vlm_prefix.p_yes_sharing_image(vlm, img, QUESTIONS, batch_size)
    assert vlm_prefix.STATS["image_encodings"] - before["image_encodings"] == 1
    # the prefix, then ceil(5 / batch size) passes over the questions' own tokens
    assert vlm_prefix.STATS["forward_passes"] - before["forward_passes"] == 1 + -(-len(QUESTIONS) // batch_size)
    np.testing.assert_allclose(shared, vlm.p_yes([img] * len(QUESTIONS), QUESTIONS, batch_size=1), atol=1e-5)


def test_a_batch_after_a_larger_one_starts_from_the_prefix_alone(local):
    """Batches of 3 then 2: the cache repeated for the first is cut back to one row for the second."""
    vlm, img = local["qwen"], image(7, (64, 48))
    shared = vlm_prefix.p_yes_sharing_image(vlm, img, QUESTIONS, 3)
    np.testing.assert_allclose(shared, vlm.p_yes([img] * len(QUESTIONS), QUESTIONS, batch_size=1), atol=1e-5)


@pytest.mark.parametrize("questions", [QUESTIONS[:2], [QUESTIONS[0], QUESTIONS[0]]],
                         ids=["two", "one-asked-twice"])
def test_two_questions_or_one_asked_twice_still_share_the_image(local, questions):
    """Two questions share the prefix too; a question asked twice (an attribute listed twice) is all
    prefix but its last token, which its own pass then reads."""
    vlm, img = local["qwen"], image(9, (64, 64))
    before = dict(vlm_prefix.STATS)
    shared = vlm_prefix.p_yes_sharing_image(vlm, img, questions, 8)
    assert vlm_prefix.STATS["image_encodings"] - before["image_encodings"] == 1
    assert vlm_prefix.STATS["forward_passes"] - before["forward_passes"] == 2
    np.testing.assert_allclose(shared, vlm.p_yes([img] * len(questions), questions, batch_size=1), atol=1e-5)


@pytest.mark.parametrize("name", ["qwen", "critic"])
def test_the_questions_tokens_are_the_processors_without_processing_the_image_again(local, name, monkeypatch):
    vlm, img = local[name], image(3, (80, 48))
    first = vlm._encode([img], [QUESTIONS[0]])["input_ids"][0].tolist()
    want = [first] + [vlm._encode([img], [q])["input_ids"][0].tolist() for q in QUESTIONS[1:]]
    image_token = getattr(vlm.model.config, "image_token_id", None) or vlm.model.config.image_token_index
    monkeypatch.setattr(vlm, "_encode", lambda *a: pytest.fail("the image was processed again"))
    assert vlm_prefix.question_rows(vlm, first, QUESTIONS, image_token) == want


def test_token_ids_that_do_not_splice_back_leave_the_rows_to_the_processor(local):
    """Where the chat text tokenized alone does not give back the processor's first row, nothing is
    spliced (the caller asks the processor for each row): here, a first row not made for the image."""
    vlm = local["qwen"]
    first = vlm._encode([image(3, (80, 48))], [QUESTIONS[0]])["input_ids"][0].tolist()
    image_token = vlm.model.config.image_token_id
    assert vlm_prefix.question_rows(vlm, first[:-1], QUESTIONS, image_token) is None
    assert vlm_prefix.question_rows(vlm, first, QUESTIONS, None) is None
