"""Load multiple-choice benchmark files into the MedReason record shape that evaluation scores.

Formats (``eval.benchmarks[].format``):

- ``mcq``: MedQA / MedMCQA style rows: ``question``, ``options`` ({"A": text, ...}, a list of
  texts, or an "A. text" string), ``answer_idx`` (a letter, or an integer 0-based index).
  Any other multiple-choice file works through ``fields`` (our name -> the file's column),
  e.g. ``{question: stem, options: choices, answer_idx: label, id: qid}``.
- ``pubmedqa``: yes/no/maybe questions. Options are {A: yes, B: no, C: maybe} unless the row has
  its own; the gold is ``answer_idx`` or the ``answer``/``final_decision`` word. A ``context``
  column, when present, is put before the question.
- ``medreason``: rows of the MedReason dataset itself (options as one "Answer Choices:" string,
  the gold recovered from the ``answer`` text as prepare does).

Files are .jsonl, .json (a list of rows, or a mapping id -> row) or .parquet, read from a local
path, any store URI (s3://bucket/key) or the hub (``hub:<owner>/<repo>/<file>[@<revision>]``),
by medreason.sources. Options and letters follow medreason.records, the rules prepare uses:
every record gets 2 to 26 options lettered A.. in order and a gold letter among them; a row
that breaks this is an InputError naming the file, the row and the fix, or, with the entry's
``bad_rows: skip``, is left out and counted with its reason (``read_benchmark``).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from medreason.errors import InputError
from medreason.records import (
    LETTERS,
    check_options,
    coerce_options,
    normalize_text,
    options_string,
    recover_letter,
)
from medreason.sources import read_source

log = logging.getLogger(__name__)

PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
FORMATS = ("mcq", "pubmedqa", "medreason")


# -- reading files -------------------------------------------------------------------------------

def jsonl_objects(lines: Iterable[str], where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines text; a bad line is an
    InputError naming ``where`` and the line."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where} line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where} line {lineno}: expected a JSON object per line")
        yield lineno, row


def _json_rows(text: str, path: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, list):
        return [(str(i), row) for i, row in enumerate(data)]
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        # PubMedQA's own release is {pmid: row}: the key is the id.
        return [(str(k), v) for k, v in data.items()]
    raise InputError(f"{path}: expected a JSON list of rows or a mapping id -> row")


def read_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(row id fallback, row) pairs from a .jsonl/.json/.parquet file at any path
    medreason.sources.read_source reads (local, store URI, hub)."""
    found = read_source(path, what="benchmark")
    name = found.name.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return [(str(i), row) for i, row in enumerate(pq.read_table(io.BytesIO(found.raw)).to_pylist())]
    try:
        text = found.raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None
    if name.endswith((".jsonl", ".ndjson")):
        return [(str(lineno - 1), row) for lineno, row in jsonl_objects(io.StringIO(text), path)]
    if name.endswith(".json"):
        return _json_rows(text, path)
    raise InputError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")


def benchmark_questions(path: str, question_field: str = "question",
                        rows: list[tuple[str, dict[str, Any]]] | None = None) -> list[str]:
    """Questions of a benchmark file (MCQ jsonl, PubMedQA, MedReason, ...) for decontamination:
    the ``question`` column, with a PubMedQA ``context`` column put before it when present."""
    out = []
    for _rid, row in read_rows(path) if rows is None else rows:
        question = row.get(question_field)
        if not isinstance(question, str):
            continue
        context = row.get("context") or row.get("CONTEXTS")
        if isinstance(context, list):
            context = " ".join(str(c) for c in context)
        if isinstance(context, str) and context.strip():
            question = f"{context}\n{question}"
        out.append(question)
    if not out:
        raise InputError(f"decontamination file {path}: no rows with a {question_field!r} text field")
    return out


# -- gold letters ----------------------------------------------------------------------------------
def gold_from_index(value: Any, options: dict[str, str], where: str) -> str:
    """A letter from answer_idx: 'C', '(C)', or an integer 0-based index."""
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{where}: no gold answer (answer_idx is empty); map it with fields: {{answer_idx: <column>}}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        idx = int(value)
        if not 0 <= idx < len(options):
            raise InputError(f"{where}: answer index {idx} is outside the {len(options)} options (0-based)")
        return LETTERS[idx]
    letter = str(value).strip().strip("()").strip().upper()
    if letter not in options:
        raise InputError(
            f"{where}: gold answer {value!r} is not one of the option letters {', '.join(options)}; "
            "fix the row or map the right column with fields: {answer_idx: <column>}"
        )
    return letter


# -- records ---------------------------------------------------------------------------------------
def _field(row: dict[str, Any], fields: dict[str, str], key: str, *fallbacks: str) -> Any:
    if key in fields:
        return row.get(fields[key])
    for name in (key, *fallbacks):
        if name in row:
            return row[name]
    return None


def _pubmedqa_gold(row: dict[str, Any], fields: dict[str, str], question: str,
                   where: str) -> tuple[str, dict[str, str], str]:
    """(question with its context, options, gold letter) of a PubMedQA row."""
    options = coerce_options(_field(row, fields, "options")) or dict(PUBMEDQA_OPTIONS)
    context = _field(row, fields, "context", "CONTEXTS", "contexts")
    if isinstance(context, list):
        context = "\n".join(str(c) for c in context)
    if isinstance(context, str) and context.strip() and context.strip() not in question:
        question = f"{context.strip()}\n{question}"
    check_options(options, where)
    raw_gold = _field(row, fields, "answer_idx")
    if raw_gold is None:
        word = _field(row, fields, "answer", "final_decision")
        inverse = {normalize_text(v): k for k, v in options.items()}
        raw_gold = inverse.get(normalize_text(str(word or "")))
        if raw_gold is None:
            raise InputError(f"{where}: gold answer {word!r} is not one of {', '.join(options.values())}")
    return question, options, gold_from_index(raw_gold, options, where)


def _medreason_gold(row: dict[str, Any], fields: dict[str, str], where: str) -> tuple[dict[str, str], str]:
    """(options, gold letter) of a MedReason row: answer_idx, else the letter prepare recovers."""
    options = coerce_options(_field(row, fields, "options"))
    check_options(options, where)
    raw_gold = _field(row, fields, "answer_idx")
    if raw_gold is not None:
        return options, gold_from_index(raw_gold, options, where)
    gold = recover_letter(str(_field(row, fields, "answer") or ""), options)
    if not gold:
        raise InputError(f"{where}: cannot tell which option the answer names; add an answer_idx column")
    return options, gold


def to_record(
    row: dict[str, Any], fallback_id: str, fmt: str, name: str, fields: dict[str, str], where: str
) -> dict[str, Any]:
    """One benchmark row -> the MedReason record shape (with options_map and answer_letter)."""
    if fmt not in FORMATS:
        raise InputError(f"{where}: unknown benchmark format {fmt!r}; use mcq, pubmedqa or medreason")
    question = _field(row, fields, "question", "QUESTION", "stem")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: no question text; map it with fields: {{question: <column>}}")
    question = question.strip()
    rid = _field(row, fields, "id", "realidx", "id_in_dataset", "pmid", "qid")
    rid = fallback_id if rid is None or str(rid).strip() == "" else str(rid)
    dataset_name = name
    if fmt == "pubmedqa":
        question, options, gold = _pubmedqa_gold(row, fields, question, where)
    elif fmt == "medreason":
        options, gold = _medreason_gold(row, fields, where)
        dataset_name = str(row.get("dataset_name") or name)
        rid = str(row.get("id_in_dataset", rid))
    else:
        options = coerce_options(_field(row, fields, "options", "choices"))
        check_options(options, where)
        gold = gold_from_index(_field(row, fields, "answer_idx", "answer_letter", "label"), options, where)
    return {
        "uid": f"{dataset_name}:{rid}",
        "dataset_name": dataset_name,
        "id_in_dataset": rid,
        "question": question,
        "options": options_string(options),
        "options_map": options,
        "reasoning": "",
        "answer": options[gold],
        "answer_letter": gold,
    }


# Why a row cannot be scored, from the InputError it raised: (phrase in the message, reason).
BAD_ROW_REASONS = (
    ("no question text", "empty question"),
    ("no options", "no options"),
    ("options; between", "fewer than 2 or more than 26 options"),
    ("in order without gaps", "option letters not A.. in order"),
    ("has no text", "an option without text"),
    ("no gold answer", "no gold answer"),
    ("cannot tell which option", "no gold answer"),
    ("is not one of", "answer not among the options"),
    ("is outside the", "answer not among the options"),
)


def bad_row_reason(message: str) -> str:
    """A short, countable reason for a row's InputError message ('other' when none fits)."""
    return next((reason for phrase, reason in BAD_ROW_REASONS if phrase in message), "other")


@dataclass
class LoadedBenchmark:
    """A benchmark's scorable records and, with ``bad_rows: skip``, the rows left out:
    ``[{"row": 1-based row, "id": the row's id, "reason": short reason, "detail": message}]``."""

    records: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def skipped_summary(self) -> dict[str, Any]:
        """{"skipped": n, "by_reason": {reason: n}, "rows": [...]} for metrics.json."""
        return {"skipped": len(self.skipped),
                "by_reason": dict(Counter(s["reason"] for s in self.skipped).most_common()),
                "rows": self.skipped}


def read_benchmark(bench: Any, rows: list[tuple[str, dict[str, Any]]] | None = None) -> LoadedBenchmark:
    """Records of one ``eval.benchmarks`` entry (a BenchmarkConfig), in file order, up to
    ``limit`` rows. Every row is checked (question, options, gold letter); a bad one is an
    InputError naming the benchmark, its file and the row, or with ``bad_rows: skip`` it is
    left out and listed with its reason. ``rows``: the file's rows when already read."""
    rows = read_rows(bench.path) if rows is None else rows
    if bench.limit:
        rows = rows[: bench.limit]
    skip = getattr(bench, "bad_rows", "fail") == "skip"
    loaded = LoadedBenchmark(records=[])
    for i, (fallback_id, row) in enumerate(rows):
        where = f"benchmark {bench.name!r} ({bench.path}) row {i + 1}"
        try:
            loaded.records.append(to_record(row, fallback_id, bench.format, bench.name, dict(bench.fields), where))
        except InputError as exc:
            if not skip:
                raise
            detail = str(exc).removeprefix(f"{where}: ")
            rid = _field(row, dict(bench.fields), "id", "realidx", "id_in_dataset", "pmid", "qid")
            loaded.skipped.append({"row": i + 1, "id": fallback_id if rid is None else str(rid),
                                   "reason": bad_row_reason(detail), "detail": detail})
    if loaded.skipped:
        log.warning("benchmark %s: %d unusable rows skipped (%s)", bench.name, len(loaded.skipped),
                    ", ".join(f"{r}: {n}" for r, n in loaded.skipped_summary()["by_reason"].items()))
    if not loaded.records:
        what = "no usable rows (all were skipped as bad rows)" if loaded.skipped else "no rows"
        raise InputError(f"benchmark {bench.name!r} ({bench.path}) has {what}")
    log.info("benchmark %s: %d questions from %s", bench.name, len(loaded.records), bench.path)
    return loaded


def load_benchmark(bench: Any, rows: list[tuple[str, dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """The scorable records of one ``eval.benchmarks`` entry (see ``read_benchmark``)."""
    return read_benchmark(bench, rows).records
