"""Text checks behind the benchmark's gold reward: small pure functions, each documented.

Every instruction family of the benchmark (see `families.py`) and the little synthetic set of
`training/synthetic_prefs.py` decide "does this response follow the instruction?" with these
functions. They are deterministic, use no model, and are meant to be read: where a rule has to pick
a convention (what a word, a sentence or a bullet is) the docstring says which one.

    >>> word_count("It's a 3-part test.")
    5
    >>> sentence_count("One. Two! Three? four")
    4
    >>> bullet_count("Intro\\n- a\\n* b\\n1. c")
    2
"""

from __future__ import annotations

import json
import re

_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+")
_BULLET = re.compile(r"^\s*[-*]\s+\S", re.M)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.S | re.I)
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")
_POSTSCRIPT = re.compile(r"^\s*p\.\s?s\.", re.M | re.I)
_TITLE = re.compile(r"<<[^<>\n]+>>")


def words(text: str) -> list[str]:
    """Words: runs of letters/digits, with inner apostrophes kept ("it's" is one word, "3-part" two).

    >>> words("Don't stop -- P.S. ok")
    ["Don't", 'stop', 'P', 'S', 'ok']
    """
    return _WORD.findall(text)


def word_count(text: str) -> int:
    """Number of `words`."""
    return len(words(text))


def sentences(text: str) -> list[str]:
    """Sentences: the text is cut after '.', '!' or '?' (plus closing quotes/brackets) followed by
    whitespace, and at every line break; pieces without a letter or digit are ignored. A trailing
    piece with no end punctuation still counts. Abbreviations ("e.g. this") are cut, a known and
    accepted simplification.

    >>> sentences("Hi there. How are you?\\n- fine")
    ['Hi there.', 'How are you?', '- fine']
    """
    out = []
    for line in text.splitlines():
        for piece in _SENTENCE_END.split(line):
            piece = piece.strip()
            if piece and any(c.isalnum() for c in piece):
                out.append(piece)
    return out


def sentence_count(text: str) -> int:
    """Number of `sentences`."""
    return len(sentences(text))


def ends_sentence(text: str) -> bool:
    """True when the text (stripped) ends with '.', '!' or '?'."""
    return text.rstrip().endswith((".", "!", "?"))


def has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def all_capitals(text: str) -> bool:
    """No lower-case letter and at least one letter."""
    return has_letters(text) and text == text.upper()


def all_lowercase(text: str) -> bool:
    """No upper-case letter and at least one letter."""
    return has_letters(text) and text == text.lower()


def word_pattern(forms: str | list[str] | tuple[str, ...]) -> re.Pattern:
    """A case-insensitive whole-word pattern for one word or several forms of it ("bee", "bees")."""
    forms = [forms] if isinstance(forms, str) else list(forms)
    return re.compile(r"\b(?:" + "|".join(re.escape(f) for f in forms) + r")\b", re.I)


def count_word(text: str, forms: str | list[str] | tuple[str, ...]) -> int:
    """Occurrences of a word as a whole word, ignoring case; `forms` lists accepted forms.

    >>> count_word("Bees and a bee, but not beeswax.", ["bee", "bees"])
    2
    """
    return len(word_pattern(forms).findall(text))


def contains_word(text: str, word: str, *, whole_word: bool = True) -> bool:
    """Whether `word` occurs, ignoring case; as a whole word or (whole_word=False) as any substring."""
    if whole_word:
        return count_word(text, word) > 0
    return word.lower() in text.lower()


def bullet_count(text: str) -> int:
    """Lines that are markdown bullets: optional indent, '-' or '*', a space, then text.
    Numbered lines ("1. x") and bold markers ("**x**") are not bullets."""
    return len(_BULLET.findall(text))


def only_bullets(text: str, *, min_items: int = 2) -> bool:
    """Every non-empty line is a bullet and there are at least `min_items` of them."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return len(lines) >= min_items and bullet_count(text) == len(lines)


def paragraph_count(text: str) -> int:
    """Blocks of text separated by at least one blank line."""
    return len([p for p in _PARAGRAPH_BREAK.split(text.strip()) if p.strip()])


def json_object(text: str) -> dict | None:
    """The response parsed as one JSON object (a ```json fence around it is allowed), else None."""
    t = text.strip()
    m = _FENCE.match(t)
    if m:
        t = m.group(1).strip()
    try:
        value = json.loads(t)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def json_has_key(text: str, key: str) -> bool:
    """The response is a JSON object (see `json_object`) with `key` at its top level."""
    obj = json_object(text)
    return obj is not None and key in obj


def starts_with(text: str, phrase: str) -> bool:
    """The stripped response begins with `phrase`, ignoring case."""
    return text.strip().lower().startswith(phrase.strip().lower())


def ends_with(text: str, phrase: str) -> bool:
    """The stripped response ends with `phrase`, ignoring case (nothing may follow it)."""
    return text.strip().lower().endswith(phrase.strip().lower())


def has_title(text: str) -> bool:
    """A title in double angular brackets, `<<like this>>`, on one line."""
    return _TITLE.search(text) is not None


def wrapped_in_quotes(text: str) -> bool:
    """The stripped response starts and ends with a double quotation mark (") and is longer than it."""
    t = text.strip()
    return len(t) > 1 and t[0] == '"' and t[-1] == '"'


def has_postscript(text: str) -> bool:
    """A line that starts with "P.S." (or "p. s.", ignoring case)."""
    return _POSTSCRIPT.search(text) is not None


def placeholder_count(text: str) -> int:
    """Square-bracket placeholders such as [address] (non-empty, on one line)."""
    return len(_PLACEHOLDER.findall(text))


def ends_with_question(text: str) -> bool:
    """The stripped response ends with a question mark."""
    return text.rstrip().endswith("?")
