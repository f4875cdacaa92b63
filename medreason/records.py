"""The record rules every stage shares: one text normaliser, one option parser with one letter
rule, and the gold-letter recovery. prepare (training labels), the benchmark loader (benchmark
labels) and answer extraction all use these, so a row gets the same letters everywhere.

Options are lettered A..Z in order (2 to 26 options); MedReason has at most 10 today, and
benchmarks with 11-22 options (e.g. MedXpertQA's text questions have 10, some exam sets more)
read the same way.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from medreason.errors import InputError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MIN_OPTIONS = 2

# Apostrophes go ("Colle's" -> "colles"); other punctuation and symbols ("%", "+", "/", "-")
# become spaces, so "ST-elevation" -> "st elevation".
_NON_WORD_RE = re.compile(r"[^\w\s]|_")
_APOSTROPHE_RE = re.compile(r"['\u2019`]")
# Combining marks left by NFKD ("é" -> "e" + U+0301). A regex, not a per-character
# unicodedata.combining() loop: that loop took ~50 s on prepare's 32k questions.
_COMBINING_RE = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")

# An option line: "A. text", "A) text", "(A) text", "A: text". The letter is a capital A..Z.
_OPTION_RE = re.compile(r"^\s*\(?([A-Z])\s*[.):]\s?(.*)$")
_HEADER_RE = re.compile(r"^\s*answer choices\s*:?\s*$", re.IGNORECASE)
_DECISION_RE = re.compile(r"^\s*the final decision is\s*:?\s*(yes|no|maybe)\b", re.IGNORECASE)
_PAREN_LETTER_RE = re.compile(r"^\s*\(([A-Z])\)(?:\s+(.*))?$", re.DOTALL)
_LETTER_PREFIX_RE = re.compile(r"^\s*([A-Z])\s*[.):]\s*(.*)$", re.DOTALL)


# -- text -----------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Accents, case and punctuation removed, whitespace collapsed:
    "Colle's  ST-elevation." -> 'colles st elevation', "Café-au-lait" -> 'cafe au lait'.

    The one normaliser for duplicate questions, decontamination, option matching in gold
    letters and in model answers, so formatting noise (case, accents, punctuation, line breaks)
    never hides a repeat or a match.
    """
    text = _COMBINING_RE.sub("", unicodedata.normalize("NFKD", text))
    text = _APOSTROPHE_RE.sub("", text.lower())
    return " ".join(_NON_WORD_RE.sub(" ", text).split())


# -- options --------------------------------------------------------------------------------------
def parse_options(options: str) -> dict[str, str]:
    """'Answer Choices:\\nA. x\\nB. y' -> {'A': 'x', 'B': 'y'}.

    The letter rule: option letters run A, B, C... in order, up to Z. A line opens the next
    option only when its letter is the next one, so 'C. difficile' inside option B's text is not
    option C unless C is due. Other lines continue the previous option; an "Answer Choices:"
    header line is skipped.
    """
    out: dict[str, str] = {}
    last: str | None = None
    for line in (options or "").splitlines():
        m = _OPTION_RE.match(line)
        if m and len(out) < len(LETTERS) and m.group(1) == LETTERS[len(out)]:
            last = m.group(1)
            out[last] = m.group(2).strip()
        elif last is not None and line.strip() and not _HEADER_RE.match(line):
            out[last] = f"{out[last]} {line.strip()}"
    return out


def options_string(options: dict[str, str]) -> str:
    """The MedReason options string: 'Answer Choices:\\nA. x\\nB. y'."""
    return "Answer Choices:\n" + "\n".join(f"{k}. {v}" for k, v in options.items())


def _one_line(text: Any) -> str:
    # An option text with a line break would split its "X. text" line in the prompt.
    return " ".join(str(text).split())


def coerce_options(value: Any) -> dict[str, str]:
    """A dict {letter: text} from a dict, a list of texts, a JSON object string or an options
    string (parsed by :func:`parse_options`, the same rule prepare uses)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k).strip().upper(): _one_line(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        # More texts than letters is reported by check_options (it sees the count).
        if len(value) > len(LETTERS):
            return {f"#{i + 1}": _one_line(v) for i, v in enumerate(value)}
        return {LETTERS[i]: _one_line(v) for i, v in enumerate(value)}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                return coerce_options(json.loads(text))
            except json.JSONDecodeError:
                pass
        return parse_options(text)
    return {}


def check_options(options: dict[str, str], where: str) -> None:
    """InputError unless there are 2..26 options lettered A.. in order, each with text."""
    if not options:
        raise InputError(
            f"{where}: no options; multiple-choice rows need an options column "
            "({'A': ..., 'B': ...}, a list, or 'A. ...' lines); map it with fields: {options: <column>}"
        )
    n = len(options)
    if not MIN_OPTIONS <= n <= len(LETTERS):
        raise InputError(f"{where}: {n} options; between {MIN_OPTIONS} and {len(LETTERS)} are supported")
    if list(options) != list(LETTERS[:n]):
        raise InputError(
            f"{where}: option letters {', '.join(options)} must be A.. in order without gaps "
            f"(expected {', '.join(LETTERS[:n])})"
        )
    empty = [k for k, v in options.items() if not v]
    if empty:
        raise InputError(f"{where}: option {', '.join(empty)} has no text")


# -- the gold letter ------------------------------------------------------------------------------
def _starts_with_words(text: str, prefix: str) -> bool:
    return bool(prefix) and text.startswith(prefix) and (len(text) == len(prefix) or text[len(prefix)] == " ")


def _longest_prefix(norm_answer: str, norm_opts: dict[str, str]) -> str | None:
    """The option whose text the answer starts with, longest first; "" on a tie between
    equally long different texts; None when none."""
    prefixes = sorted((k for k, v in norm_opts.items() if _starts_with_words(norm_answer, v)),
                      key=lambda k: len(norm_opts[k]), reverse=True)
    if not prefixes:
        return None
    if len(prefixes) > 1 and len(norm_opts[prefixes[0]]) == len(norm_opts[prefixes[1]]) \
            and norm_opts[prefixes[0]] != norm_opts[prefixes[1]]:
        return ""
    return prefixes[0]


def _by_decision(answer: str, options: dict[str, str], norm_opts: dict[str, str]) -> str | None:
    m = _DECISION_RE.match(answer)
    if not m:
        return None
    hits = [k for k, v in norm_opts.items() if v == m.group(1).lower()]
    return hits[0] if hits else ""


def _by_paren_letter(answer: str, options: dict[str, str], norm_opts: dict[str, str]) -> str | None:
    m = _PAREN_LETTER_RE.match(answer)
    return m.group(1) if m and m.group(1) in options else None


def _by_letter_and_text(answer: str, options: dict[str, str], norm_opts: dict[str, str]) -> str | None:
    m = _LETTER_PREFIX_RE.match(answer)
    if m and m.group(1) in options and _starts_with_words(normalize_text(m.group(2)), norm_opts[m.group(1)]):
        return m.group(1)
    return None


def _by_exact_text(answer: str, options: dict[str, str], norm_opts: dict[str, str]) -> str | None:
    norm_answer = normalize_text(answer)
    exact = [k for k, v in norm_opts.items() if v and v == norm_answer]
    return exact[0] if exact else None


def _by_text_prefix(answer: str, options: dict[str, str], norm_opts: dict[str, str]) -> str | None:
    return _longest_prefix(normalize_text(answer), norm_opts)


def _by_letter(answer: str, options: dict[str, str], norm_opts: dict[str, str]) -> str | None:
    m = _LETTER_PREFIX_RE.match(answer)
    if m and m.group(1) in options:
        return m.group(1)
    bare = answer.strip().rstrip(".").strip()
    return bare if len(bare) == 1 and bare in options else None


# In order; the first rule that decides (a letter, or "" for "cannot tell") wins.
_LETTER_RULES = (_by_decision, _by_paren_letter, _by_letter_and_text, _by_exact_text, _by_text_prefix, _by_letter)


def recover_letter(answer: str, options_map: dict[str, str]) -> str:
    """The gold option letter named by a MedReason ``answer``; "" when no option matches.

    Rules, first match wins:
      1. pubmedqa "The final decision is: yes ..." -> the option whose text is yes/no/maybe;
      2. MedXpertQA "(B) text" or a bare "(B)" -> B;
      3. "B. text" / "B) text" whose text starts with option B's text -> B;
      4. the answer equals an option's text (normalized: medqa);
      5. the answer starts with option texts (medmcqa "<text>. Explanation: ..."): the longest
         such option wins; a tie between equally long different letters is left unknown;
      6. "B. text" / "B) text" / bare "B" where B is an option -> B (the text differs, e.g. a
         paraphrase; checked after 4-5 so an option text like "C. difficile" wins over letter C).
    """
    if not options_map or not answer.strip():
        return ""
    norm_opts = {k: normalize_text(v) for k, v in options_map.items()}
    for rule in _LETTER_RULES:
        letter = rule(answer, options_map, norm_opts)
        if letter is not None:
            return letter
    return ""
