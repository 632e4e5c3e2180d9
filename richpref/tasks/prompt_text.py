"""A source row's prompt as the models get it: `clean_prompt(value, max_chars)` -> (prompt, None) or
(None, reason).

Control characters carry no meaning for an image model: tabs, newlines and the other control and
line/paragraph separator characters become spaces, and runs of whitespace one space. Of the invisible
format characters (Unicode category Cf):
- a zero-width space marks a word break (Thai, Khmer, Burmese are written without spaces): a space;
- ZWNJ and ZWJ, and the tag characters of emoji flags, change what the text says (👩‍🚀 is one emoji,
  👩 🚀 two; Persian and Indic spelling): kept;
- the others only shape how the text is set (a soft hyphen, a word joiner, a byte order mark, bidi
  marks): dropped, so a soft hyphen inside a word leaves the word whole.
"""
from __future__ import annotations

import unicodedata
from typing import Any

AS_SPACE = frozenset({"Cc", "Zl", "Zp"})
WORD_BREAK = "\u200b"  # zero-width space
JOINERS = frozenset({"\u200c", "\u200d"})  # ZWNJ, ZWJ
EMOJI_TAGS = range(0xE0020, 0xE0080)  # tag characters: a black flag + tags spell a subdivision's flag (Scotland's)


def _clean_char(ch: str) -> str:
    category = unicodedata.category(ch)
    if category in AS_SPACE or ch == WORD_BREAK:
        return " "
    if category == "Cf" and ch not in JOINERS and ord(ch) not in EMOJI_TAGS:
        return ""
    return ch


def clean_prompt(value: Any, max_chars: int) -> tuple[str | None, str | None]:
    """(prompt, None) or (None, reason)."""
    if value is None:
        return None, "bad_prompt: missing"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_prompt: not valid UTF-8"
    if not isinstance(value, str):
        return None, f"bad_prompt: expected text, got {type(value).__name__}"
    text = " ".join("".join(map(_clean_char, value)).split())
    if all(unicodedata.category(ch) == "Cf" for ch in text):  # nothing visible: joiners alone are no prompt
        return None, "bad_prompt: empty"
    if len(text) > max_chars:
        return None, f"bad_prompt: {len(text)} characters, over source.max_prompt_chars={max_chars}"
    return text, None
