"""VisionLanguageModel on the tiny LLaVA-OneVision and Qwen2.5-VL models (CPU, offline)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from richpref.models.tiny.vlm import (
    SINGLE_TOKEN_WORDS,
    build_bpe_tokenizer,
    build_tiny_llava_onevision,
    build_tiny_qwen2_5_vl,
)
from richpref.models.vlm import VisionLanguageModel, expected_score_from_probs

BUILDERS = {"llava_onevision": build_tiny_llava_onevision, "qwen2_5_vl": build_tiny_qwen2_5_vl}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(name)) for name, build in BUILDERS.items()}


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def vlm(request, tiny_dirs):
    model = VisionLanguageModel.load(str(tiny_dirs[request.param]), device="cpu")
    yield model
    model.close()


@pytest.fixture(scope="module")
def items():
    # Different sizes and modes, so batches need padding (different numbers of image tokens).
    rng = np.random.RandomState(0)
    images = [
        Image.new("RGB", (64, 48), (200, 30, 30)),
        Image.fromarray(rng.randint(0, 255, (120, 90, 3), dtype=np.uint8)),
        Image.new("L", (30, 100), 128),
    ]
    prompts = [
        "Describe the image.",
        "Does the image match the prompt 'a red apple'? Answer yes or no.",
        "Rate the image from 1 to 9.",
    ]
    return images, prompts


def test_tiny_models_are_small(tiny_dirs):
    for path in tiny_dirs.values():
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        assert size < 2 * 1024 * 1024, (path, size)


def test_load_offline(vlm, tiny_dirs):
    assert vlm.model.config.model_type in BUILDERS
    assert not vlm.model.training
    assert vlm.tokenizer.padding_side == "left"
    assert vlm.model.generation_config.eos_token_id == vlm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert vlm.model.generation_config.pad_token_id == vlm.tokenizer.pad_token_id


def test_generate_deterministic_and_batch_independent(vlm, items):
    images, prompts = items
    a = vlm.generate(images, prompts, max_new_tokens=6, batch_size=3)
    assert len(a) == 3 and all(isinstance(t, str) for t in a)
    assert vlm.generate(images, prompts, max_new_tokens=6, batch_size=3) == a
    assert vlm.generate(images, prompts, max_new_tokens=6, batch_size=1) == a


def test_option_probabilities(vlm, items):
    images, prompts = items
    options = ["Yes", "No"]
    p3 = vlm.option_probabilities(images, prompts, options, batch_size=3)
    assert p3.shape == (3, 2)
    np.testing.assert_allclose(p3.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(vlm.option_probabilities(images, prompts, options, batch_size=1), p3, atol=1e-5)

    # Manual: one item, full logits from a plain forward, softmax over the vocabulary.
    inputs = vlm._encode(images[:1], prompts[:1])
    with torch.inference_mode():
        logits = vlm.model(**inputs).logits[0, -1].float()
    ids = [vlm.tokenizer.encode(o, add_special_tokens=False)[0] for o in options]
    probs = torch.softmax(logits, dim=-1)[ids].double().numpy()
    np.testing.assert_allclose(p3[0], probs / probs.sum(), atol=1e-5)


def test_option_probabilities_rejects_shared_first_token(vlm, items):
    images, prompts = items
    with pytest.raises(ValueError):
        vlm.option_probabilities(images[:1], prompts[:1], ["1", "10"])


def test_expected_score(vlm, items):
    images, prompts = items
    scores = vlm.expected_score(images, prompts, batch_size=2)
    assert scores.shape == (3,)
    assert np.all((scores >= 0) & (scores <= 1))
    probs = vlm.option_probabilities(images, prompts, [str(m) for m in range(1, 10)])
    np.testing.assert_allclose(scores, expected_score_from_probs(probs, range(1, 10)), atol=1e-9)


def test_expected_score_from_probs():
    # E = 0.2*1 + 0.3*2 + 0.5*3 = 2.3 -> (2.3 - 1) / (3 - 1) = 0.65
    np.testing.assert_allclose(expected_score_from_probs(np.array([[0.2, 0.3, 0.5]]), [1, 2, 3]), [0.65])
    # Unnormalised rows are renormalised first: [2, 3, 5] is the same distribution.
    np.testing.assert_allclose(expected_score_from_probs(np.array([[2.0, 3.0, 5.0]]), [1, 2, 3]), [0.65])
    # Extremes and a 1-9 scale: all mass on 9 -> 1, all on 1 -> 0, uniform -> 0.5.
    p = np.zeros((3, 9))
    p[0, 8] = 1
    p[1, 0] = 1
    p[2] = 1 / 9
    np.testing.assert_allclose(expected_score_from_probs(p, range(1, 10)), [1.0, 0.0, 0.5])
    with pytest.raises(ValueError):
        expected_score_from_probs(np.array([[0.5, 0.5]]), [1, 2, 3])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_builders_are_seed_deterministic(name, tmp_path):
    build = BUILDERS[name]
    a = load_file(build(tmp_path / "a", seed=0) / "model.safetensors")
    b = load_file(build(tmp_path / "b", seed=0) / "model.safetensors")
    c = load_file(build(tmp_path / "c", seed=1) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_single_token_answers(vlm):
    tok = vlm.tokenizer
    for word in ["yes", " yes", "no", " no", "Yes", "No"] + [str(d) for d in range(10)]:
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
    for special in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]:
        assert tok.encode(special, add_special_tokens=False) == [tok.convert_tokens_to_ids(special)]


def test_tokenizer_vocab_is_deterministic():
    a = build_bpe_tokenizer(["<image>"])
    b = build_bpe_tokenizer(["<image>"])
    assert a.get_vocab() == b.get_vocab()
    assert all(len(a.encode(w, add_special_tokens=False)) == 1 for w in SINGLE_TOKEN_WORDS)
    assert a.eos_token == "<|im_end|>" and a.pad_token == "<|endoftext|>"


def test_close(tiny_dirs, items):
    images, prompts = items
    model = VisionLanguageModel.load(str(tiny_dirs["qwen2_5_vl"]), device="cpu")
    model.close()
    with pytest.raises(RuntimeError):
        model.generate(images[:1], prompts[:1])


def test_generate_detailed_reports_cut_off_answers(vlm, items):
    images, prompts = items
    gens = vlm.generate_detailed(images, prompts, max_new_tokens=6, batch_size=3)
    assert [g.text for g in gens] == vlm.generate(images, prompts, max_new_tokens=6, batch_size=3)
    # Random weights never pick the end token within 6 steps here: every answer is cut off.
    assert all(not g.finished and g.new_tokens == 6 for g in gens)


def test_generate_detailed_sees_the_end_token(vlm, items):
    images, prompts = items
    # Declare the token the model picks first (greedy) an end token: the answer ends at once.
    inputs = vlm._encode(images[:1], prompts[:1])
    with torch.inference_mode():
        first = int(vlm.model(**inputs).logits[0, -1].argmax())
    gen = vlm.model.generation_config
    saved = gen.eos_token_id
    gen.eos_token_id = [first]
    try:
        [g] = vlm.generate_detailed(images[:1], prompts[:1], max_new_tokens=6)
    finally:
        gen.eos_token_id = saved
    assert g.finished and g.new_tokens == 0


def test_option_spellings_are_summed(vlm, items):
    images, prompts = items
    options = [("Yes", "yes", " Yes"), ("No", "no")]
    p = vlm.option_probabilities(images, prompts, options, batch_size=2)
    inputs = vlm._encode(images, prompts)
    with torch.inference_mode():
        probs = torch.softmax(vlm.model(**inputs).logits[:, -1].float(), dim=-1).double().numpy()
    tok = vlm.tokenizer
    ids = [[tok.encode(s, add_special_tokens=False)[0] for s in group] for group in options]
    yes = probs[:, ids[0]].sum(axis=1)
    no = probs[:, ids[1]].sum(axis=1)
    np.testing.assert_allclose(p[:, 0], yes / (yes + no), atol=1e-5)
    # p_yes sums every spelling in YES_NO (all single tokens in the tiny vocabularies).
    from richpref.models.vlm import YES_NO

    ids = [[tok.encode(s, add_special_tokens=False)[0] for s in group] for group in YES_NO]
    yes, no = probs[:, ids[0]].sum(axis=1), probs[:, ids[1]].sum(axis=1)
    np.testing.assert_allclose(vlm.p_yes(images, prompts, batch_size=3), yes / (yes + no), atol=1e-5)


def test_options_sharing_a_token_are_refused(vlm, items):
    images, prompts = items
    with pytest.raises(ValueError, match="share a token"):
        vlm.option_probabilities(images[:1], prompts[:1], [("Yes", "yes"), ("yes", "No")])
