"""Text guards for edit instructions, after the failure modes RPO reports (appendix D).

Pure string functions, tested on a corpus of realistic answers (tests/data/instruction_corpus.yaml,
scored by bench/instruction_guards.py):

- `split_sentences`: a model that writes two edits on one line ("Add a second dog. Change the
  ball's color to red.") gives two instructions;
- `says_no_edit`: "No edits are needed; the image already matches the prompt." is an answer, not
  an instruction;
- `is_commentary`: "This will make it look like he is slicing." after an edit remarks on it;
- `contradiction`: an instruction that removes, replaces or recolours what the prompt asks for
  ("Replace the ice cream with a giant chocolate bar" for a prompt about ice cream). Words the
  prompt lacks are not a fault by themselves: elaborations such as "terracotta roofs" make an
  edit concrete.
"""
from __future__ import annotations

import re

from .vlm_text import _stem, content_words, leading_verb, object_phrase

# Sentence ends followed by the start of a new sentence (optionally numbered: "... corner. 2. Make").
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=(?:\d+[.)]\s+)?[A-Z\"\u201c])")
_INLINE_NUMBER = re.compile(r"^\d+[.)]\s+")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st.", "no.")


def split_sentences(item: str) -> list[str]:
    """The sentences of one list item, each stripped of an inline number ("2. Make ...")."""
    parts: list[str] = []
    for piece in _SENTENCE_END.split(item.strip()):
        if parts and (parts[-1].lower().endswith(_ABBREVIATIONS) or re.fullmatch(r"\d+[.)]", parts[-1])):
            parts[-1] = f"{parts[-1]} {piece}"
        else:
            parts.append(piece)
    return [p for p in (_INLINE_NUMBER.sub("", x).strip() for x in parts) if p]


_NO_EDIT_WHOLE = re.compile(
    r"^\W*(?:none|n/?a|nothing(?:\s+to\s+(?:edit|change|fix))?|no\s+(?:further\s+|additional\s+)?"
    r"(?:edits?|changes?|modifications?|adjustments?|corrections?|instructions?))\W*$", re.I)
_NO_EDIT_SAID = re.compile(
    r"\bno\s+(?:further\s+|additional\s+)?(?:edits?|changes?|modifications?|adjustments?|corrections?)\s+"
    r"(?:are\s+|is\s+)?(?:needed|necessary|required)\b"
    r"|\b(?:already|fully|perfectly|closely|accurately)\s+(?:matches|aligns|fits|reflects|depicts|shows|follows)\b"
    r"|\b(?:is|looks)\s+(?:already\s+|fully\s+)?consistent\s+with\s+the\s+(?:prompt|description)\b"
    r"|\bmatches\s+the\s+(?:prompt|description)\b", re.I)
# Verbs that open an edit; a sentence opening with one is an instruction even if it mentions the prompt.
_IMPERATIVE = frozenset("""
add insert include introduce put place create draw remove delete erase eliminate get replace swap
substitute change modify adjust alter edit fix correct make turn move shift rotate flip resize enlarge
shrink increase decrease reduce raise lower recolor recolour color colour paint straighten sharpen blur
brighten darken ensure give cover connect redraw dim age dent fill show extend crop
""".split())


def _opens_with_verb(text: str) -> bool:
    split = leading_verb(text)
    return split is not None and split[0] in _IMPERATIVE


def says_no_edit(text: str) -> bool:
    """True for a statement that the image needs no edit ("None.", "No changes are necessary.",
    "The image already matches the prompt."), not for an edit that mentions the prompt."""
    t = (text or "").strip()
    if _NO_EDIT_WHOLE.match(t):
        return True
    return not _opens_with_verb(t) and bool(_NO_EDIT_SAID.search(t))


_COMMENTARY = re.compile(
    r"^(?:this|that|these|those|doing\s+so|together|overall|this\s+way|that\s+way)\b[^.!?]{0,40}?\b"
    r"(?:will|would|should|can|could|makes?|ensures?|helps?|creates?|gives?|brings?|keeps?|improves?|"
    r"aligns?|matches|better)\b", re.I)


# A short opening phrase and its comma ("Overall, ", "This way, "), after which an edit may still follow.
_OPENER = re.compile(r"^[^,.!?]{1,30},\s*")


def is_commentary(sentence: str) -> bool:
    """A remark about the edits ("This will make ...", "These changes ensure ..."), not an edit: an
    imperative, also after an opening phrase ("Overall, make the colours more vivid"), is an edit."""
    text = (sentence or "").strip()  # a remark opens with "this", "overall" ..., never with a verb
    return bool(_COMMENTARY.match(text)) and not _opens_with_verb(_OPENER.sub("", text, count=1))


_REMOVE = frozenset("remove delete erase eliminate".split())
_REPLACE = frozenset("replace swap substitute exchange".split())
_TRANSFORM = frozenset("change turn convert transform".split())
_RECOLOUR = frozenset("make paint color colour recolor recolour".split())
# Words that mark a surplus copy or a part: removing "the extra hand" or "one of the puppies" fixes a count.
_SURPLUS = frozenset("""
extra second third fourth fifth sixth additional duplicate duplicated excess spare stray redundant
surplus superfluous unwanted misplaced floating
""".split())
_PARTIAL = re.compile(r"^(?:one|some|a\s+few|two|three|any|part|half|several|most)\s+of\s+", re.I)
COLOURS = frozenset("""
red orange yellow green blue purple violet pink brown black white grey gray beige cream gold golden
silver bronze tan turquoise teal cyan magenta maroon navy crimson scarlet ivory lavender olive
""".split())


def _head(phrase: str) -> tuple[str | None, str | None]:
    """(head noun, possessor) of a noun phrase, stemmed: its last content word, and the noun before
    "'s" when there is one ("the cat's extra tail" -> ("tail", "cat"))."""
    possessor = None
    marks = list(re.finditer(r"(?:'s|s')\s", phrase))
    if marks:
        m = marks[-1]
        before = phrase[: m.start() + (1 if m.group().startswith("s") else 0)]
        phrase = phrase[m.end():]
        owners = [w for w in _words(before) if content_words(w)]
        possessor = _stem(owners[-1]) if owners else None
    words = [w for w in _words(phrase) if content_words(w)]
    return (_stem(words[-1]) if words else None), possessor


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z][a-z'-]*", text.lower())


def _prompt_colours(head: str, prompt: str) -> set[str]:
    """Colours the prompt gives `head`: colour words among the two words before it ("a yellow taxi")."""
    words = [_stem(w) for w in _words(prompt)]
    found = set()
    for k, w in enumerate(words):
        if w == head:
            found |= {x for x in words[max(0, k - 2):k] if x in COLOURS}
    return found


def _colour_conflict(phrase: str, new_words: set[str], prompt: str) -> str | None:
    """A recolouring to a colour the prompt does not name, of a thing the prompt gives a colour."""
    new_colours = {w for w in new_words if w in COLOURS} - content_words(prompt)
    if not new_colours:
        return None
    head, possessor = _head(phrase)
    for noun in filter(None, (head, possessor)):
        asked = _prompt_colours(noun, prompt)
        if asked and not asked & new_words:
            return (f"makes the {noun} {'/'.join(sorted(new_colours))}, where the prompt asks for a "
                    f"{'/'.join(sorted(asked))} {noun}")
    return None


def contradiction(instruction: str, prompt: str) -> str | None:
    """Why `instruction` undoes what `prompt` asks for, or None.

    - removing a thing the prompt names ("Remove the umbrella"), unless the phrase marks a surplus
      copy or a part ("the extra hand", "one of the puppies");
    - replacing or turning a thing the prompt names into something else ("Replace the ice cream with
      a chocolate bar", "Turn the fox into a wolf"); replacing it with another of its kind ("the
      sliced loaf with a round sourdough loaf") is a correction;
    - changing a property from a value the prompt asks for ("from red to blue" for "a red car"), or
      recolouring a thing the prompt gives another colour ("Make the cat orange" for "a black cat").
    The head noun of a phrase is its last content word.
    """
    split = leading_verb(instruction)
    if split is None:
        return None
    verb, rest = split
    asked = content_words(prompt)
    lower = rest.lower()
    if verb in _REMOVE:
        phrase = object_phrase(rest)
        if _PARTIAL.match(phrase) or _SURPLUS & set(phrase.lower().split()):
            return None
        head, _ = _head(re.split(r"\sof\s", phrase, maxsplit=1)[0])
        return f"removes {phrase!r}, which the prompt asks for" if head in asked else None
    from_to = re.search(r"\bfrom\s+(.+?)\s+(?:to|into)\s+(.+)$", rest, re.I)
    if verb in _TRANSFORM | _RECOLOUR and from_to:
        old, new = content_words(from_to.group(1)), content_words(from_to.group(2))
        lost = (old & asked) - new
        return f"changes {'/'.join(sorted(lost))}, which the prompt asks for, to {from_to.group(2).strip(' .')!r}" if lost else None
    m = re.search(r"\s(?:with|by|for|into|to)\s" if verb in _REPLACE else r"\s(?:into|to)\s", lower)
    if (verb in _REPLACE or verb in _TRANSFORM) and m:
        phrase, new_text = rest[: m.start()], rest[m.end():]
        new = content_words(new_text)
        if new and new <= COLOURS:  # "Change the apple to red": the thing stays, its colour changes
            return _colour_conflict(phrase, new, prompt)
        head, _ = _head(object_phrase(phrase))
        if head in asked and head not in new:
            replaces = verb in _REPLACE
            return (f"{'replaces' if replaces else 'turns'} {object_phrase(phrase)!r}, which the prompt asks for, "
                    f"{'with' if replaces else 'into'} {new_text.strip(' .')!r}")
        return None
    if verb in _RECOLOUR or verb == "turn":
        words = object_phrase(rest).split()
        if len(words) >= 2:  # "make the cat orange": the last word is the new property
            return _colour_conflict(" ".join(words[:-1]), content_words(words[-1]), prompt)
    return None


__all__ = ["COLOURS", "contradiction", "is_commentary", "says_no_edit", "split_sentences"]
