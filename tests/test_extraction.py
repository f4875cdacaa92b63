"""Answer extraction over realistic generations, including the tricky cases."""

from __future__ import annotations

import pytest

from medreason.extraction import extract_answer
from medreason.records import normalize_text

FOUR = {"A": "Ethosuximide", "B": "Carbamazepine", "C": "Phenytoin", "D": "Vitamin D deficiency"}
NERVES = {"A": "Radial nerve", "B": "Axillary nerve", "C": "Musculocutaneous nerve", "D": "Ulnar nerve"}
TEN = {letter: f"Option text {i}" for i, letter in enumerate("ABCDEFGHIJ")}
PUBMED = {"A": "yes", "B": "no", "C": "maybe"}
ALPHABET = {letter: f"Choice number {i}" for i, letter in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")}
TWELVE = {k: v for k, v in ALPHABET.items() if k <= "L"}

CASES = [
    # (generation, options, expected letter, expected method)
    ("Reasoning: T-type channels.\nThe answer is C.", FOUR, "C", "answer_is"),
    ("The answer is (B)", FOUR, "B", "answer_is"),
    ("So the answer is **A**.", FOUR, "A", "answer_is"),
    ("Therefore, the correct answer is: D", FOUR, "D", "answer_is"),
    ("The answer is not A but C", FOUR, "C", "answer_is"),
    ("At first the answer is A. On reflection, the answer is C.", FOUR, "C", "answer_is"),
    ("The answer is A and C.", FOUR, None, "unparsed"),
    ("A and C", FOUR, None, "unparsed"),
    ("Both A and C look right, but the answer is C.", FOUR, "C", "answer_is"),
    ("The answer is c.", FOUR, "C", "answer_is"),
    ("the answer is a drug that blocks calcium channels", FOUR, None, "unparsed"),
    ("The answer is E.", FOUR, None, "unparsed"),  # E is not an option here
    ("The answer is J.", TEN, "J", "answer_is"),
    ("Answer: H", TEN, "H", "answer_is"),
    ("(G) Option text 6", TEN, "G", "lone_letter"),
    # Letters beyond J, for the questions that have them, and only for those.
    ("The answer is Z.", ALPHABET, "Z", "answer_is"),
    ("Answer: (Q)", ALPHABET, "Q", "answer_is"),
    ("## Final Answer\n(K) Choice number 10", TWELVE, "K", "final_answer"),
    ("L", TWELVE, "L", "lone_letter"),
    ("The answer is M.", TWELVE, None, "unparsed"),  # M is not one of A..L
    ("The answer is K.", TEN, None, "unparsed"),
    ("At first the answer is X. On reflection, the answer is W.", ALPHABET, "W", "answer_is"),
    ("The answer is X and Y.", ALPHABET, None, "unparsed"),
    # "x" of "x-ray" joins no option of a 4-option question: C stands.
    ("The answer is C and x-ray confirms it.", FOUR, "C", "answer_is"),
    ("Final Answer: B", NERVES, "B", "answer_is"),
    ("## Final Answer\n(D) Ulnar nerve", NERVES, "D", "final_answer"),
    ("**Final Answer**\n\nOption B", NERVES, "B", "final_answer"),
    ("Radial and ulnar nerves are spared.\nFinal answer - the axillary nerve.", NERVES, "B", "final_answer"),
    ("C", FOUR, "C", "lone_letter"),
    ("(C)", FOUR, "C", "lone_letter"),
    ("C.", FOUR, "C", "lone_letter"),
    ("C) Phenytoin", FOUR, "C", "lone_letter"),
    ("  b  ", NERVES, "B", "lone_letter"),
    ("A patient with absence seizures should receive ethosuximide.", FOUR, "A", "option_text"),
    ("A patient with these findings needs urgent imaging.", FOUR, None, "unparsed"),
    ("Vitamin D deficiency explains the low calcium.", FOUR, "D", "option_text"),
    ("Phenytoin or carbamazepine could both be used.", FOUR, None, "unparsed"),
    ("The axillary nerve winds around the surgical neck.", NERVES, "B", "option_text"),
    ("Yes.", PUBMED, "A", "option_text"),
    ("The data suggest yes, maybe, it is valuable.", PUBMED, None, "unparsed"),
    ("The final decision is: no.", PUBMED, "B", "option_text"),
    ("", FOUR, None, "unparsed"),
    ("Conclusion: Carbamazepine worsens absence seizures; ethosuximide is preferred.\n"
     "The answer is A. Ethosuximide", FOUR, "A", "answer_is"),
]


@pytest.mark.parametrize(("text", "options", "letter", "method"), CASES,
                         ids=[f"{i:02d}" for i in range(len(CASES))])
def test_extraction_table(text: str, options: dict[str, str], letter: str | None, method: str) -> None:
    assert extract_answer(text, options) == (letter, method)


def test_no_options_is_unparsed() -> None:
    assert extract_answer("The answer is A", {}) == (None, "unparsed")


def test_normalize() -> None:
    # The one normaliser of medreason.records: apostrophes go, accents and punctuation too.
    assert normalize_text("  Colle's   fascia!") == "colles fascia"
    assert normalize_text("Café-au-lait") == "cafe au lait"


def test_option_text_match_ignores_apostrophes_and_accents() -> None:
    options = {"A": "Colle's fascia", "B": "Scarpa's fascia", "C": "Café-au-lait spots"}
    assert extract_answer("It is the colles fascia.", options) == ("A", "option_text")
    assert extract_answer("Classic cafe au lait spots here", options) == ("C", "option_text")
