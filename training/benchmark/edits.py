"""Controlled edits: turn one generation into many responses that satisfy or break instructions.

A response under construction is a `Draft`: body sentences (some "pinned": inserted by an edit and
kept when the body is shortened), a layout (prose, bullets, paragraphs) and framing (title, start
and end phrases, postscript, closing question, letter case, a JSON or quotation wrapper). Each
instruction family (see `families.py`) edits the draft to satisfy or to break its check, and
`render` turns the draft into text in one fixed order:

    body (layout) -> title / start / end / postscript / question -> word substitution
    -> commas -> letter case -> wrapper

Length targets (word range, sentence count) are met last, by `fit`: it renders, measures, and drops,
truncates or adds filler sentences until the measured count lands in the target (or gives up after a
few rounds). Nothing here decides the gold label: the benchmark always re-measures the final text
with the checks, so an edit that misses its aim yields an honestly labelled response.

    >>> d = Draft([Sentence("The moon is bright.")], fillers=["It has craters."])
    >>> d.case = "upper"; render(d)
    'THE MOON IS BRIGHT.'
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field

from . import checks

_MARKERS = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)])\s+")
_HEADING = re.compile(r"^\s*#+\s")
_SPLIT = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+")
_SENT_START = re.compile(r"(^|[.!?]\s+|\n\s*(?:[-*]\s+)?)([a-z])")


@dataclass
class Sentence:
    text: str
    pinned: bool = False
    """Inserted by an edit for an instruction: dropped last when the body is shortened."""


@dataclass
class Draft:
    """A response under construction (see the module docstring)."""

    sentences: list[Sentence]
    fillers: list[str] = field(default_factory=list)
    """Sentences `fit` and the layouts may add, in order (the topic's facts, then generic ones)."""
    layout: str = "prose"
    """"prose", "bullets" (one item per block) or "paragraphs"."""
    blocks: int = 1
    title: str | None = None
    """The whole title line, e.g. "<<The Moon>>"."""
    start: str | None = None
    start_after_first: str | None = None
    """A phrase placed after the first sentence (a near miss of a start phrase)."""
    end: str | None = None
    end_at_start: str | None = None
    """A phrase placed at the very start (a near miss of an end phrase)."""
    postscript: str | None = None
    """The whole postscript line, e.g. "P.S. Thanks."."""
    question: str | None = None
    trailing: str | None = None
    """A statement appended after everything else (to make the text end in a statement)."""
    trailing_if_question: bool = False
    """Append `trailing` only when the text would otherwise end with a question mark."""
    substitute: tuple[tuple[str, ...], str] | None = None
    """(word forms, alias): every form is replaced by the alias."""
    commas: str | None = None
    """"remove" or "ensure"."""
    case: str | None = None
    """"upper", "lower" or "sentence" (capitalise sentence starts; undoes all-caps)."""
    wrap: tuple[str, str] | None = None
    """("json", key) or ("quote", mark)."""
    word_target: tuple[int, int] | None = None
    sentence_target: int | None = None
    log: list[str] = field(default_factory=list)
    """The edits applied, for the row's metadata."""

    def copy(self) -> "Draft":
        return copy.deepcopy(self)

    def next_filler(self) -> str:
        if not self.fillers:
            return "That is the short version."
        text = self.fillers.pop(0)
        self.fillers.append(text)  # cycle, so a draft never runs dry
        return text

    def add(self, text: str, *, pinned: bool = False, at: int | None = None) -> None:
        s = Sentence(text, pinned)
        self.sentences.insert(len(self.sentences) if at is None else at, s)


# ---------------------------------------------------------------------------------------------
# From a raw generation to sentences


def split_sentences(text: str) -> list[str]:
    """Clean a raw generation into complete prose sentences: list markers and bold marks are
    removed, heading-like lines (markdown headings, short lines without end punctuation that are not
    list items, <<titles>>) dropped, lines joined, and an unfinished last piece (a generation cut at
    max tokens) dropped unless it is the only one, which then gets a full stop.

    >>> split_sentences("## Facts\\n1. **Bees** fly.\\n2. They make hon")
    ['Bees fly.']
    """
    raw_lines = [ln for ln in text.replace("**", "").replace("__", "").splitlines() if ln.strip()]
    lines = []
    for i, line in enumerate(raw_lines):
        if _HEADING.match(line):
            continue
        is_item = bool(_MARKERS.match(line))
        line = _MARKERS.sub("", line).strip()
        if not line or line.startswith(("<<", "```")) or not any(c.isalpha() for c in line):
            continue
        last = i == len(raw_lines) - 1
        if not last and not checks.ends_sentence(line) and not line.endswith(":"):
            if not is_item and len(checks.words(line)) <= 8:
                continue  # a heading, a name or a date line
            if is_item:
                line += "."  # a list item without a full stop is a sentence (not the last: maybe cut)
        lines.append(line)
    pieces = [p.strip() for p in _SPLIT.split(" ".join(lines)) if p.strip()]
    pieces = [p for p in pieces if any(c.isalpha() for c in p) and not p.endswith(":")]
    complete = [p for p in pieces if checks.ends_sentence(p)]
    if complete:
        return complete
    return [pieces[0].rstrip(" ,;:-") + "."] if pieces else []


def truncate_words(sentence: str, n: int) -> str:
    """The first `n` words of a sentence (n >= 1) as a sentence ending with a full stop."""
    tokens = sentence.split()
    if len(checks.words(sentence)) <= n:
        return sentence
    out, count = [], 0
    for tok in tokens:
        c = len(checks.words(tok))
        if count + c > n and out:
            break
        out.append(tok)
        count += c
    text = " ".join(out).rstrip(" ,;:-\"'")
    text = re.sub(r"\b(?:and|or|but|the|a|an|of|to|with|in|for)$", "", text, flags=re.I).rstrip(" ,;:-")
    if not text:
        text = out[0]
    return text.rstrip(".!?") + "."


# ---------------------------------------------------------------------------------------------
# Rendering


def _lower_first(text: str) -> str:
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


def sentence_case(text: str) -> str:
    """Undo all-caps, then capitalise the first letter of every sentence and line.

    >>> sentence_case("HELLO THERE. BYE")
    'Hello there. Bye'
    """
    if text == text.upper():
        text = text.lower()
    return _SENT_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def _blocks(sentences: list[str], n: int) -> list[list[str]]:
    """Split sentences, in order, into `n` non-empty blocks as even as possible."""
    n = max(1, min(n, len(sentences)))
    size, extra = divmod(len(sentences), n)
    out, i = [], 0
    for b in range(n):
        k = size + (1 if b < extra else 0)
        out.append(sentences[i:i + k])
        i += k
    return out


def render(d: Draft) -> str:
    """The text of a draft (see the module docstring for the order of the steps)."""
    sents = [s.text for s in d.sentences]
    if d.commas == "ensure" and sents and not any("," in s for s in sents):
        sents[0] = "In short, " + _lower_first(sents[0])
    if d.start_after_first and sents:
        sents.insert(1, d.start_after_first)
    if d.end_at_start:
        sents.insert(0, d.end_at_start)
    if d.layout == "prose" or d.blocks < 1:
        body = " ".join(sents)
    else:
        if len(sents) < d.blocks:  # a layout needs one sentence per block (edits add them; a fallback)
            pad = d.fillers or ["That is the short version."]
            sents = sents + [pad[i % len(pad)] for i in range(d.blocks - len(sents))]
        groups = _blocks(sents, d.blocks)
        if d.layout == "bullets":
            body = "\n".join("- " + " ".join(g) for g in groups)
        else:
            body = "\n\n".join(" ".join(g) for g in groups)
    text = body
    if d.start:
        text = d.start + ("\n" if d.layout == "bullets" else " ") + text
    if d.end:
        text = text + ("\n" if d.layout == "bullets" else " ") + d.end
    if d.title:
        text = d.title + "\n" + text
    if d.postscript:
        text = text + "\n\n" + d.postscript
    if d.question:
        text = text + " " + d.question
    if d.trailing and (not d.trailing_if_question or checks.ends_with_question(text)):
        text = text + " " + d.trailing
    if d.substitute:
        forms, alias = d.substitute
        text = checks.word_pattern(forms).sub(alias, text)
    if d.commas == "remove":
        text = text.replace(", ", " ").replace(",", "")
    if d.case == "upper":
        text = text.upper()
    elif d.case == "lower":
        text = text.lower()
    elif d.case == "sentence":
        text = sentence_case(text)
    if d.wrap:
        kind, arg = d.wrap
        text = json.dumps({arg: text}, ensure_ascii=False) if kind == "json" else f"{arg}{text}{arg}"
    return text


# ---------------------------------------------------------------------------------------------
# Length targets


def _drop_one(d: Draft, keep: int) -> bool:
    """Drop the last unpinned sentence (else the last pinned one) if more than `keep` remain."""
    if len(d.sentences) <= keep:
        return False
    for i in range(len(d.sentences) - 1, -1, -1):
        if not d.sentences[i].pinned:
            del d.sentences[i]
            return True
    del d.sentences[-1]
    return True


def _shorten_words(d: Draft, excess: int) -> bool:
    """Remove about `excess` words by truncating the longest unpinned (else any) sentence."""
    pool = [s for s in d.sentences if not s.pinned] or d.sentences
    if not pool:
        return False
    longest = max(pool, key=lambda s: checks.word_count(s.text))
    n = checks.word_count(longest.text)
    if n <= 2:
        return False
    longest.text = truncate_words(longest.text, max(2, n - excess))
    return True


def fit(d: Draft, rounds: int = 24) -> Draft:
    """Meet `sentence_target` and `word_target` by measuring the rendered text and adjusting the
    body: drop sentences (unpinned first), truncate long sentences, add filler sentences."""
    min_keep = d.blocks if d.layout != "prose" else 1
    if d.sentence_target is not None:
        for _ in range(rounds):
            n = checks.sentence_count(render(d))
            if n == d.sentence_target:
                break
            if n > d.sentence_target:
                if not _drop_one(d, min_keep):
                    break
            else:
                d.add(d.next_filler())
    if d.word_target is not None:
        lo, hi = d.word_target
        for _ in range(rounds):
            n = checks.word_count(render(d))
            if lo <= n <= hi:
                break
            if n > hi:
                # Whole sentences while that stays above `lo`, else truncate one.
                last = d.sentences[-1] if d.sentences else None
                if (last and not last.pinned and len(d.sentences) > min_keep
                        and n - checks.word_count(last.text) >= lo and d.sentence_target is None):
                    d.sentences.pop()
                elif not _shorten_words(d, n - hi):
                    break
            else:
                filler = d.next_filler()
                room = hi - n
                if checks.word_count(filler) > room and room >= 3:
                    filler = truncate_words(filler, room)
                d.add(filler)
    return d
