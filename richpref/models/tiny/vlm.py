"""Tiny random-weight vision-language models of the real architectures, built offline.

Tests, CI and the demo profile need a VLM that goes through exactly the same code path as the real
critics (Qwen2.5-VL, LLaVA-Critic = LLaVA-OneVision) without the Hub. These builders construct the
real transformers classes with hidden sizes of a few dozen units, a small byte-level BPE tokenizer
trained in memory, and a ChatML chat template, and save everything with `save_pretrained` so that
`AutoProcessor.from_pretrained(dir)` / `AutoModelForImageTextToText.from_pretrained(dir)` load them
like any checkpoint. Weights are random but deterministic in `seed`; the outputs are gibberish, which
is all tests need.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

# ChatML markers shared by both families (Qwen2 text backbones).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"

# Words a critic answers with; each must be a single token so that `option_probabilities` and
# `expected_score` (which read the first token of each option) see the whole answer.
SINGLE_TOKEN_WORDS = [" yes", "yes", " no", "no", "Yes", "No", " Yes", " No"] + [str(d) for d in range(10)]

# Qwen2's pre-tokenisation regex: digits are split one by one (`\p{N}` without `+`), so every
# number is a sequence of single-digit tokens, as in the real Qwen tokenizers.
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
A photo of a red apple on a wooden table.
Two dogs are playing in the green grass near a lake.
The image shows a blue car parked in front of a white house.
Is the prompt followed by the image? Answer yes or no.
Yes, the image matches the prompt.
No, the image does not match the prompt.
Rate the image on a scale from 1 to 9.
The score is 7 because the colors are bright and the layout is clear.
Count the objects: there are 3 cats and 2 birds.
Replace the yellow umbrella with a black one.
Remove the extra hand from the person on the left.
Add a small boat on the water behind the bridge.
Make the sky orange and purple at sunset.
The text on the sign is misspelled and hard to read.
A portrait of a woman with long brown hair and a gentle smile.
The man is holding a cup of coffee in his right hand.
There are 5 apples, 4 oranges and 6 bananas in the bowl.
Change the color of the shirt from green to blue.
The background is blurry, but the face is sharp and detailed.
An artifact appears near the edge of the frame.
Does the image contain a clock? Answer with yes or no.
yes
no
Yes
No
The answer is yes. The answer is no.
Fix the distorted fingers and keep everything else the same.
A cartoon drawing of a cat wearing a tiny hat.
A city street at night with neon lights and rain.
The prompt asks for three balloons, but the image shows only two.
Edit instruction: move the lamp to the right side of the desk.
The quality is high, the composition is balanced, and the lighting is soft.
A bowl of soup with a silver spoon, viewed from above.
Score: 8. The image is sharp and faithful to the prompt.
Score: 2. The image is noisy and the object is missing.
A white horse runs across a field of yellow flowers.
Critique: the shadow points in the wrong direction.
Which image is better, the first or the second?
The first image is better because the hands look natural.
The second image has fewer artifacts and more vivid colors.
0 1 2 3 4 5 6 7 8 9
one two three four five six seven eight nine ten
"""


def _chat_template(image_placeholder: str) -> str:
    """ChatML template rendering content lists; `image_placeholder` is what one image becomes."""
    return (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for content in message['content'] -%}"
        "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
        "{{- '" + image_placeholder + "' -}}"
        "{%- elif content['type'] == 'text' -%}"
        "{{- content['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- endif -%}"
    )


LLAVA_CHAT_TEMPLATE = _chat_template("<image>")
QWEN_CHAT_TEMPLATE = _chat_template("<|vision_start|><|image_pad|><|vision_end|>")


def build_bpe_tokenizer(special_tokens: list[str], vocab_size: int = 512):
    """A byte-level BPE trained in memory on a small built-in corpus; deterministic.

    `special_tokens` are the family's multimodal markers (e.g. `<image>`); ChatML markers and the pad
    token are always added. Returns a `PreTrainedTokenizerFast` with eos `<|im_end|>` and pad
    `<|endoftext|>`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    all_special = [PAD, IM_START, IM_END] + [t for t in special_tokens if t not in (PAD, IM_START, IM_END)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=all_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Each answer word, alone on its own line (so a leading space is kept or absent as written) and
    # repeated, so the trainer merges it into one token like a real vocabulary would.
    lines = _CORPUS.splitlines() + SINGLE_TOKEN_WORDS * 30
    tok.train_from_iterator(lines, trainer=trainer)

    # Belt and braces: any answer word the trainer did not merge into one token becomes a normal
    # added token (a vocabulary entry, not a special one, so decoding keeps it).
    missing = [w for w in SINGLE_TOKEN_WORDS if len(tok.encode(w).ids) != 1]
    if missing:
        from tokenizers import AddedToken

        # single_word: an added "yes" must not split "yesterday".
        tok.add_tokens([AddedToken(w, normalized=False, single_word=True) for w in missing])

    extra = {}
    names = {
        "<image>": "image_token",
        "<video>": "video_token",
        "<|image_pad|>": "image_token",
        "<|video_pad|>": "video_token",
        "<|vision_start|>": "vision_bos_token",
        "<|vision_end|>": "vision_eos_token",
    }
    for t in special_tokens:
        if t in names:
            extra[names[t]] = t
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=extra,
        padding_side="left",
        model_max_length=4096,
    )


def _finish(model, processor, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Set generation ids and save model + processor into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    pad = tokenizer.convert_tokens_to_ids(PAD)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _text_config(vocab_size: int, eos: int, pad: int, **extra) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
        **extra,
    )


def build_tiny_llava_onevision(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny `LlavaOnevisionForConditionalGeneration` (the LLaVA-Critic architecture) saved to out_dir."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = build_bpe_tokenizer(["<image>", "<video>"])
    eos, pad = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD)
    image_size = 56
    # anyres tiles: every pinpoint is a multiple of the base resolution.
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=14,
            vision_use_head=False,
        ),
        text_config=Qwen2Config(**_text_config(len(tok), eos, pad)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)

    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": image_size, "width": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size}),
        num_image_tokens=(image_size // 14) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return _finish(model, processor, tok, out_dir)


def build_tiny_qwen2_5_vl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Tiny `Qwen2_5_VLForConditionalGeneration` saved to out_dir."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = build_bpe_tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    eos, pad = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD)
    text_hidden = 64
    config = Qwen2_5_VLConfig(
        # head_dim 16: M-RoPE sections (temporal, height, width) must sum to head_dim / 2.
        text_config=_text_config(
            len(tok),
            eos,
            pad,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            out_hidden_size=text_hidden,  # the merger projects straight into the text embedding space
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)

    # Small pixel budget: 56x56 .. 112x112, i.e. 4..16 merged vision tokens per image.
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    return _finish(model, processor, tok, out_dir)
