"""Pull the chosen option letter out of a model's free-text answer.

The rules run in this order; the first that yields a valid option letter wins:

1. ``answer_is``: "The answer is X" (also "answer: X", "correct option is X"), the LAST such
   phrase whose X is a valid option letter, with optional parentheses, bold and a trailing
   period. "The answer is not A but C" gives C; "the answer is A and C" settles nothing.
2. ``final_answer``: a "Final Answer" section (the last one): the first letter in it that is
   written as an option label ("B", "(B)", "B.", "B)", "**B**", "Option B"), else a match of
   exactly one option's text inside it.
3. ``lone_letter``: the whole generation is one option label: "C", "(C)", "C.", or a label
   followed by text, "C) Ethosuximide ...".
4. ``option_text``: exactly one option's normalized text occurs in the generation (an option
   whose match lies inside another option's match, "Vitamin D" inside "Vitamin D deficiency",
   does not count separately). Several different options -> ambiguous -> unparsed.

Letters run A..Z (a question has 2 to 26 options), and a letter counts only when it is one of
that question's options: "The answer is K" answers a 12-option question, not a 4-option one.
A letter counts only as a whole token: the "A" of "A patient" or the "D" of "Vitamin D" is
never an answer. Lowercase letters count only where they cannot be an English word: right
after "answer is" and followed by punctuation or the end ("the answer is c."), or as the whole
generation. An answer no rule parses is ``None`` with method ``unparsed``; it is scored wrong
and counted separately as a parse failure.
"""

from __future__ import annotations

import re

from medreason.records import normalize_text

METHODS = ("answer_is", "final_answer", "lone_letter", "option_text", "unparsed")

# Decoration that may wrap a letter: markdown bold/italics, quotes, brackets.
_DECOR = r"[\s*_`'\"]*"
# What may follow a letter for it to be a label rather than the first letter of a word.
_AFTER_LABEL = r"(?![A-Za-z0-9])"
# A second letter joined to the first ("A and C", "A, C", "A/C", "A or C"): several answers.
_JOINED = re.compile(r"^[\s*_)\].]*(?:,|/|&|\band\b|\bor\b)\s*\(?\s*(?P<letter>[A-Za-z])" + _AFTER_LABEL)

_ANSWER_IS = re.compile(
    r"\b(?:answer|correct\s+(?:option|choice)|best\s+(?:option|choice))\b[\s*_]*"
    r"(?:is|would\s+be|should\s+be|must\s+be|=|:)[\s*_:]*"
    r"(?:(?:probably|likely|most\s+likely|therefore|thus|clearly|definitely)\s+)?"
    r"(?P<neg>not\s+" + _DECOR + r"[(\[]?" + _DECOR + r"[A-Za-z]" + _AFTER_LABEL + r"[\s*_)\].,;]*"
    r"(?:but\s+(?:rather\s+)?)?)?"
    + _DECOR + r"[(\[]?" + _DECOR + r"(?:option\s+|choice\s+)?"
    r"(?P<letter>[A-Za-z])" + _AFTER_LABEL,
    re.IGNORECASE,
)
_FINAL_HEADER = re.compile(r"final\s+answer", re.IGNORECASE)
# An option label inside a Final Answer section: at its start, in brackets, or after "option".
_SECTION_LABEL = re.compile(
    r"(?:^[\s*_#:\-–>]*(?:(?i:is|option|choice)\s+)?[(\[]?\s*(?P<start>[A-Z])"
    r"(?=\s*(?:$|[.):\]\-–,*])))"
    r"|(?:[(\[]\s*(?P<bracket>[A-Z])\s*[)\]])"
    r"|(?:\b(?i:option|choice)\s+(?P<option>[A-Z])" + _AFTER_LABEL + r")",
)
_LONE = re.compile(
    r"^[\s*_`'\"]*[(\[]?\s*(?P<letter>[A-Za-z])\s*[)\]]?[\s*_`'\"]*"
    r"(?:$|[.):\]]\s*(?P<rest>.*)$)",
    re.DOTALL,
)


def _valid(letter: str | None, options: dict[str, str]) -> str | None:
    if letter is None:
        return None
    letter = letter.upper()
    return letter if letter in options else None


def _joined(tail: str, options: dict[str, str]) -> bool:
    """Whether ``tail`` starts by joining a second valid option letter ("A and C", "A, C"):
    several answers. Only the question's own letters count: "C and x-ray" joins no option."""
    m = _JOINED.match(tail)
    return bool(m) and m.group("letter").upper() in options


def _by_answer_is(text: str, options: dict[str, str]) -> str | None:
    found = None
    for m in _ANSWER_IS.finditer(text):
        letter = m.group("letter")
        tail = text[m.end():]
        if letter.islower():
            # "the answer is a drug..." is English, not option A: lowercase only when followed
            # by punctuation or the end.
            if not re.match(r"^\s*(?:$|[.),;:!\]*\n])", tail):
                continue
        if _joined(tail, options):
            continue  # "the answer is A and C": several answers, this phrase settles nothing
        valid = _valid(letter, options)
        if valid:
            found = valid  # keep going: the last "answer is" wins
    return found


def _text_match(text: str, options: dict[str, str]) -> str | None:
    """The one option whose normalized text occurs in ``text`` (None when none or several)."""
    haystack = f" {normalize_text(text)} "
    spans: list[tuple[int, int, str]] = []
    for letter, option in options.items():
        needle = normalize_text(option)
        if not needle:
            continue
        for m in re.finditer(re.escape(f" {needle} "), haystack):
            spans.append((m.start(), m.end(), letter))
    if not spans:
        return None
    # Drop a match that lies inside a longer match of another option ("vitamin d" inside
    # "vitamin d deficiency").
    kept = {
        letter
        for start, end, letter in spans
        if not any(
            s <= start and end <= e and (e - s) > (end - start) and other != letter
            for s, e, other in spans
        )
    }
    return kept.pop() if len(kept) == 1 else None


def _by_final_answer(text: str, options: dict[str, str]) -> str | None:
    headers = list(_FINAL_HEADER.finditer(text))
    if not headers:
        return None
    section = text[headers[-1].end():]
    section = re.sub(r"^[\s*_#:\-–>]*(?:is\b)?", "", section)
    # The section ends at the next blank line: what follows is usually an explanation.
    section = re.split(r"\n\s*\n", section.strip(), maxsplit=1)[0]
    first_line = section.split("\n", 1)[0]
    m = _SECTION_LABEL.search(first_line) or _SECTION_LABEL.search(section)
    if m:
        letter = _valid(m.group("start") or m.group("bracket") or m.group("option"), options)
        if letter and not _joined(section[m.end():], options):
            return letter
    return _text_match(section, options)


def _by_lone_letter(text: str, options: dict[str, str]) -> str | None:
    stripped = text.strip()
    m = _LONE.match(stripped)
    if not m:
        return None
    letter = m.group("letter")
    rest = (m.group("rest") or "").strip()
    if letter.islower() and rest:
        return None  # "a. ..." could be prose; accept lowercase only as the whole answer
    if rest and _joined(stripped[m.start("letter") + 1:], options):
        return None
    return _valid(letter, options)


def extract_answer(text: str, options: dict[str, str]) -> tuple[str | None, str]:
    """(letter or None, method) for a generation, given the {letter: text} options."""
    if not text or not options:
        return None, "unparsed"
    for method, rule in (
        ("answer_is", _by_answer_is),
        ("final_answer", _by_final_answer),
        ("lone_letter", _by_lone_letter),
        ("option_text", _text_match),
    ):
        letter = rule(text, options)
        if letter:
            return letter, method
    return None, "unparsed"
