"""Tokenizers built offline.

The CLIP BPE vocabulary ships inside the open-clip-torch wheel, so a real CLIP tokenizer (same ids as
OpenAI/open_clip) can be built without the Hub. Tiny models use it; real checkpoints bring their own.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path


def _open_clip_vocab_file() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"open_clip's bundled BPE vocabulary is missing at {path}; reinstall open-clip-torch")
    return path


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Rebuild CLIP's vocab/merges exactly as open_clip's SimpleTokenizer does."""
    from open_clip.tokenizer import bytes_to_unicode

    lines = gzip.open(_open_clip_vocab_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    merge_pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(pair) for pair in merge_pairs)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(p) for p in merge_pairs]


def clip_tokenizer(model_max_length: int = 77):
    """A transformers `CLIPTokenizer` with the real CLIP vocabulary (49408 tokens), built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    tok = CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
    return tok


CLIP_VOCAB_SIZE = 49408
