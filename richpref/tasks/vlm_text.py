"""Reading and checking the free text the VLM stages generate: lists, content words, edit targets.

Pure string functions, so every rule is tested on fixed strings (random tiny models cannot write
the text a parser test needs). The guards follow the failure modes RPO reports (appendix D): edit
instructions that bring in content neither the prompt nor the critique mentions, and instructions
about things the image does not show.
"""
from __future__ import annotations

import json
import re

# A list item marker: "-", "* " (not the "**" of bold text), "•", "1." / "1)", "Step 1:".
_BULLET = re.compile(r"^\s*(?:[-\u2022]|\*(?=\s)|\d+[.)]|step\s*\d+\s*[:.)])\s*", re.I)
_FENCE = re.compile(r"^```[a-z]*\s*|\s*```$", re.I)


class ListParseError(ValueError):
    """Text that looks like a structured list but is not one (e.g. broken JSON)."""


_HEADING = re.compile(r"^\s*#{1,6}\s")
# A bold label that opens an item: "**Setting:** Place ..." or "**Age the refrigerator**: add ...".
_BOLD_LABEL = re.compile(r"^(?:\*\*|__)([^*_]+?)(?::(?:\*\*|__)|(?:\*\*|__)\s*:)\s*(?=\S)")
_EMPHASIS = re.compile(r"(\*\*|__|\*|`)(?=\S)(.+?)(?<=\S)\1")
_ARTICLE = frozenset("the a an this that its his her their".split())


def strip_markdown(item: str) -> str:
    """An item without its markdown: emphasis marks go; a short heading-like bold label before a
    colon ("**Setting:**") goes with them, while a label that is itself an instruction ("**Age the
    refrigerator**: add rust") stays as text, joined to the rest by its colon."""
    m = _BOLD_LABEL.match(item)
    if m:
        label, rest = m.group(1).strip(), item[m.end():]
        words = label.lower().split()
        item = rest if len(words) <= 3 and not _ARTICLE & set(words) else f"{label}: {rest}"
    return _EMPHASIS.sub(r"\2", item).replace("**", "").strip()


def parse_list(text: str) -> list[str]:
    """Model text -> its list items, in order, stripped of markers and quotes.

    Accepted shapes: a JSON array of strings (optionally in a ``` fence); bullet or numbered lines
    (prose lines around them, such as "Here are the edits:", are ignored); else one item per
    non-empty line. Markdown headings are left out and emphasis is removed (`strip_markdown`).
    Raises ListParseError for text that opens a JSON array but is not one.
    """
    body = _FENCE.sub("", (text or "").strip()).strip()
    if body.startswith("["):
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise ListParseError(f"looks like a JSON list but does not parse ({exc.msg} at char {exc.pos})") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ListParseError("a JSON value that is not a list of strings")
        return [strip_markdown(x.strip()) for x in data if x.strip()]
    lines = [ln for ln in body.splitlines() if ln.strip() and not _HEADING.match(ln)]
    marked = [ln for ln in lines if _BULLET.match(ln)]
    chosen = marked if marked else lines
    items = []
    for ln in chosen:
        item = strip_markdown(_BULLET.sub("", ln).strip()).strip('"\u201c\u201d').strip()
        if item:
            items.append(item)
    return items


# Function words, and the generic vocabulary of edit instructions (verbs, places in the frame,
# amounts): they say how to edit, not what, so they neither ground nor unground an instruction.
_STOPWORDS = frozenset("""
a an the this that these those it its it's they them their there here of in on at to into onto from by
with without for and or but nor so as than then too very also just only more less most least much many
some any all each every both either neither no not none is are was were be been being has have had do
does did will would should could can may might must shall i you he she we me my your our his her
which who whom whose what when where why how while if else about above below over under between
among through across around near next up down out off again further once same other another such own
everything something anything nothing everyone someone anyone else
""".split())
_EDIT_VOCAB = frozenset("""
add adds adding insert include introduce put place create draw paint remove delete erase eliminate
get rid replace swap substitute change modify adjust alter edit fix correct make turn set move shift
rotate flip resize enlarge shrink increase decrease reduce raise lower recolor recolour color colour
ensure keep show depict render give use let appear look looks visible clearly clear slightly
image picture photo scene frame area region part parts side left right top bottom front back behind
center centre middle background foreground corner edge position size shape number amount instead
new existing current currently entire whole one two three four five six seven eight nine ten
larger smaller bigger fewer extra additional another rather should needs need
improve enhance overall quality nice nicer better good great pretty prettier beautiful appealing
realistic natural accurate accurately match matches matching prompt description consistent align
""".split())
_WORD = re.compile(r"[a-z][a-z'-]*")


_VOWELS = frozenset("aeiou")


def _measure(stem: str) -> int:
    """Porter's m: the number of vowel-consonant runs in `stem` ("smil": 1, "open": 2)."""
    kinds = "".join("v" if c in _VOWELS or (c == "y" and i > 0 and stem[i - 1] not in _VOWELS) else "c"
                    for i, c in enumerate(stem))
    return re.sub(r"(.)\1+", r"\1", kinds).count("vc")


def _ends_cvc(stem: str) -> bool:
    """consonant-vowel-consonant at the end, the last not w, x or y ("smil", "hop", not "rain")."""
    return (len(stem) >= 3 and stem[-1] not in _VOWELS and stem[-1] not in "wxy" and stem[-2] in _VOWELS
            and stem[-3] not in _VOWELS)


def _strip_ing_ed(w: str) -> str:
    """'smiling'/'smiled' -> 'smile', 'running' -> 'run', 'raining' -> 'rain' (Porter's step 1b)."""
    for suffix in ("ing", "ed"):
        stem = w[: -len(suffix)]
        if not w.endswith(suffix) or len(stem) < 3 or not (set(stem) & _VOWELS) or w.endswith("eed"):
            continue
        if len(stem) > 3 and stem[-1] == stem[-2] and stem[-1] not in "lsz" and stem[-1] not in _VOWELS:
            return stem[:-1]  # running -> run, but falling -> fall, dressed -> dress
        if _measure(stem) == 1 and _ends_cvc(stem):
            return stem + "e"  # smiling -> smile, hoped -> hope
        return stem
    return w


def _stem(word: str) -> str:
    """A light folding: plurals and possessives ('apples' -> 'apple', 'boxes' -> 'box') and the -ing
    and -ed forms of a verb ('smiling', 'smiled' -> 'smile'), so an instruction's word matches its
    other forms in the prompt or critique."""
    w = word.strip("'-")
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("es") and w[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return _strip_ing_ed(w)


def content_words(text: str) -> set[str]:
    """Stemmed words of `text` that name things or properties (stopwords and edit vocabulary removed)."""
    out = set()
    for w in _WORD.findall((text or "").lower()):
        if w in _STOPWORDS or w in _EDIT_VOCAB:
            continue
        s = _stem(w)
        if len(s) > 1 and s not in _STOPWORDS and s not in _EDIT_VOCAB:
            out.add(s)
    return out


def grounding(instruction: str, context: str) -> float | None:
    """Share of the instruction's content words that also occur in `context` (prompt + critique).

    None when the instruction has no content word at all (nothing to ground, e.g. "Fix it.").
    """
    words = content_words(instruction)
    if not words:
        return None
    return len(words & content_words(context)) / len(words)


# Verbs whose object is new content: it is absent from the image by design, so it is not looked for.
_ADDITIVE = frozenset("add insert include introduce put place create draw".split())
# Verbs whose object exists and whose trailing word is the new property ("make the sky orange").
_PROPERTY = frozenset("make turn paint color colour recolor recolour".split())
_EDIT_VERBS = frozenset("""
remove delete erase eliminate replace swap substitute change modify adjust alter edit fix correct make
turn move shift rotate flip resize enlarge shrink increase decrease reduce raise lower recolor recolour
color colour paint straighten sharpen blur brighten darken
""".split()) | _PROPERTY
# Words that end the object noun phrase of an instruction.
_BOUNDARY = re.compile(
    r"\b(?:to|into|with|so|by|and|that|which|while|instead|from|for|until|because|in|on|at|onto|"
    r"near|behind|next|under|over|above|below|like|as)\b|[,.;:!?()]"
)
# Nouns ending in -ing, which are not participles opening a clause ("the cars blocking the bus").
_ING_NOUNS = frozenset("""
building ceiling clothing painting drawing ring king string wing evening morning thing railing awning
icing lighting wedding pudding sibling dumpling earring swing spring sling ceiling stocking wiring
""".split())
_ATTRIBUTE_OF = re.compile(r"^(?:the\s+)?(?:colou?r|size|shape|position|texture|material|pattern|number|"
                           r"count|style|pose|expression)s?\s+of\s+", re.I)
_LEADING = re.compile(r"^(?:(?:please|also|then|next|finally|additionally)\b,?\s+)+", re.I)


def leading_verb(instruction: str) -> tuple[str, str] | None:
    """(verb in lower case, the rest) of an instruction, with "please/also/then" and "get rid of"
    folded ("Get rid of the dog" -> ("remove", "the dog")); None when it is not a verb and a rest."""
    text = _LEADING.sub("", (instruction or "").strip())
    m = re.match(r"([A-Za-z]+)\s+(.*)$", text, re.S)
    if not m:
        return None
    verb, rest = m.group(1).lower(), m.group(2)
    if verb == "get" and rest.lower().startswith("rid of "):
        verb, rest = "remove", rest[len("rid of "):]
    return verb, rest


def object_phrase(rest: str) -> str:
    """The noun phrase that opens `rest`: up to the first preposition, conjunction or punctuation, or
    a participle that opens a clause after it ("the parked cars blocking the bus" -> "the parked cars")."""
    cut = _BOUNDARY.search(rest.lower())
    words = (rest[: cut.start()] if cut else rest).split()
    more_follows = bool(cut) and bool(re.search(r"\w", rest[cut.start():]))
    seen_content = False
    for k, w in enumerate(words):
        lw = w.lower()
        if (seen_content and lw.endswith("ing") and lw not in _ING_NOUNS
                and (k < len(words) - 1 or more_follows)):  # a participle with an object or a place
            words = words[:k]
            break
        seen_content = seen_content or bool(content_words(lw))
    return " ".join(words).strip()


def instruction_target(instruction: str) -> str | None:
    """The thing an instruction acts on, to be looked for in the image; None when not applicable.

    None for additive instructions ("add a boat ..."): their object is new. Otherwise the noun phrase
    after the leading verb (`object_phrase`), with a leading
    "the colour/size/... of" removed; for property verbs ("make the sky orange", "turn the car blue")
    the last word of a phrase of two words or more, the new property, is dropped. Also None when the first word is not an edit verb.
    """
    split = leading_verb(instruction)
    if split is None:
        return None
    verb, rest = split
    if verb in _ADDITIVE or verb not in _EDIT_VERBS:
        return None
    phrase = _ATTRIBUTE_OF.sub("", object_phrase(rest))
    words = phrase.split()
    determiners = 1 if words and words[0].lower() in ("the", "a", "an", "this", "that", "its", "their") else 0
    if verb in _PROPERTY and len(words) - determiners >= 2:
        words = words[:-1]  # "make the sky orange": the last word is the new property
    phrase = " ".join(words).strip()
    return phrase if content_words(phrase) else None


_NO_ISSUES = re.compile(r"^\W*(?:no\s+(?:issues?|problems?|misalignments?)(?:\s+found)?|none)\W*$", re.I)


def says_no_issues(critique: str) -> bool:
    """True when a critique says only that nothing is wrong ("No issues.", "None", "No problems found")."""
    return bool(_NO_ISSUES.match((critique or "").strip()))


__all__ = [
    "ListParseError",
    "content_words",
    "grounding",
    "instruction_target",
    "leading_verb",
    "object_phrase",
    "parse_list",
    "says_no_issues",
    "strip_markdown",
]
