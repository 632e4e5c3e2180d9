"""A prompt as the models get it (richpref/tasks/prompt_text.py): bad prompts get reasons; control
characters become spaces; invisible format characters are dropped unless they change what the text says."""
from __future__ import annotations

import pytest

from richpref.tasks.prompt_text import clean_prompt

SCOTLAND = "🏴\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"  # black flag + tag characters


@pytest.mark.parametrize("value,reason", [
    ("", "bad_prompt: empty"),
    ("   \t\n ", "bad_prompt: empty"),
    ("\u200d \u00ad\ufeff", "bad_prompt: empty"),  # nothing visible
    ("x" * 10_000, "bad_prompt: 10000 characters"),
    (b"\xff\xfe caf\xe9", "bad_prompt: not valid UTF-8"),
    (None, "bad_prompt: missing"),
    (42, "bad_prompt: expected text"),
])
def test_bad_prompts_get_reasons(value, reason):
    prompt, why = clean_prompt(value, 2000)
    assert prompt is None and why.startswith(reason)


@pytest.mark.parametrize("raw,prompt", [
    # control characters and a zero-width space (a word break) become spaces
    ("a\x00 red\x1b[31m cat\u200b\r\nsitting", "a red [31m cat sitting"),
    ("แมว\u200bสีแดง", "แมว สีแดง"),
    # formatting alone: a soft hyphen inside a word, a byte order mark, a word joiner, bidi marks
    ("\ufeffa beauti\u00adful sun\u2060set \u200eat dusk\u200f", "a beautiful sunset at dusk"),
    # what the text says: an emoji ZWJ sequence, a subdivision flag, Persian's ZWNJ
    ("an astronaut 👩\u200d🚀 under the flag " + SCOTLAND, "an astronaut 👩\u200d🚀 under the flag " + SCOTLAND),
    ("گربه\u200cها", "گربه\u200cها"),
])
def test_invisible_characters_are_dropped_unless_they_change_what_the_text_says(raw, prompt):
    assert clean_prompt(raw, 2000) == (prompt, None)


def test_a_prompt_of_exactly_the_limit_is_kept():
    assert clean_prompt(" " + "x" * 2000 + "\n", 2000) == ("x" * 2000, None)  # counted after cleaning
    assert clean_prompt("x" * 2001, 2000)[1] == "bad_prompt: 2001 characters, over source.max_prompt_chars=2000"
