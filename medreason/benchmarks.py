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
path, any store URI (s3://bucket/key) or the hub (``hub:<owner>/<repo>/<file in repo>``).
Every record gets 2 to 10 options lettered A.. in order and a gold letter among them; a row
that breaks this is an InputError naming the file, the row and the fix.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

from medreason.errors import InputError

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJ"
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.):]\s*(.*\S)\s*$")


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

def fetch_local(path: str) -> str:
    """A local file path for ``path`` (downloaded from the hub or a store when remote)."""
    if path.startswith("hub:"):
        spec = path[len("hub:"):].strip("/")
        parts = spec.split("/")
        if len(parts) < 3:
            raise InputError(f"benchmark path {path!r}: expected hub:<owner>/<repo>/<file>")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            from huggingface_hub import hf_hub_download

            return hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset")
        except Exception as exc:  # offline, missing repo/file, gated: all the user's to fix
            raise InputError(
                f"benchmark {path!r}: could not download {filename} from dataset {repo_id} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "on a machine without internet copy the file to a local path or the store"
            ) from None
    if "://" in path and not path.startswith("file://"):
        from medreason.store import ArtifactStore

        folder, _, name = path.rstrip("/").rpartition("/")
        store = ArtifactStore(folder)
        cache = os.path.join(
            os.environ.get("MEDREASON_LOCAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medreason"),
            "benchmarks",
        )
        os.makedirs(cache, exist_ok=True)
        local = os.path.join(cache, re.sub(r"[^A-Za-z0-9._-]+", "_", path))
        try:
            data = store.read_bytes(name)
        except FileNotFoundError:
            raise InputError(f"benchmark file not found: {store.display(name)}") from None
        with open(local, "wb") as fh:
            fh.write(data)
        return local
    local = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.isfile(local):
        raise InputError(f"benchmark file not found: {local}")
    return local


def read_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(row id fallback, row) pairs from a .jsonl/.json/.parquet file at any supported path."""
    local = fetch_local(path)
    name = path.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return [(str(i), row) for i, row in enumerate(pq.read_table(local).to_pylist())]
    with open(local, "rb") as fh:
        raw = fh.read()
    text = raw.decode("utf-8-sig")
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        return [(str(lineno - 1), row) for lineno, row in jsonl_objects(io.StringIO(text), path)]
    if name.endswith(".json"):
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
    raise InputError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")


# -- options and gold letters ---------------------------------------------------------------------
def parse_options_string(text: str) -> dict[str, str]:
    """'Answer Choices:\\nA. x\\nB. y' -> {'A': 'x', 'B': 'y'} (continuation lines are joined)."""
    options: dict[str, str] = {}
    last = None
    for line in (text or "").splitlines():
        m = _OPTION_LINE.match(line)
        if m and m.group(1) not in options:
            last = m.group(1)
            options[last] = m.group(2).strip()
        elif last and line.strip() and not line.strip().lower().startswith("answer choices"):
            options[last] = f"{options[last]} {line.strip()}"
    return options


def options_string(options: dict[str, str]) -> str:
    """The MedReason options string: 'Answer Choices:\\nA. x\\nB. y'."""
    return "Answer Choices:\n" + "\n".join(f"{k}. {v}" for k, v in options.items())


def _one_line(text: Any) -> str:
    # An option text with a line break would split its "X. text" line in the prompt.
    return " ".join(str(text).split())


def coerce_options(value: Any) -> dict[str, str]:
    """A dict {letter: text} from a dict, a list of texts, or an options string."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k).strip().upper(): _one_line(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return {LETTERS[i]: _one_line(v) for i, v in enumerate(value) if i < len(LETTERS)}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                return coerce_options(json.loads(text))
            except json.JSONDecodeError:
                pass
        return parse_options_string(text)
    return {}


def check_options(options: dict[str, str], where: str) -> None:
    if not options:
        raise InputError(
            f"{where}: no options; multiple-choice rows need an options column "
            "({'A': ..., 'B': ...}, a list, or 'A. ...' lines); map it with fields: {options: <column>}"
        )
    n = len(options)
    if not 2 <= n <= len(LETTERS):
        raise InputError(f"{where}: {n} options; between 2 and {len(LETTERS)} are supported")
    if list(options) != list(LETTERS[:n]):
        raise InputError(
            f"{where}: option letters {', '.join(options)} must be A.. in order without gaps "
            f"(expected {', '.join(LETTERS[:n])})"
        )
    empty = [k for k, v in options.items() if not v]
    if empty:
        raise InputError(f"{where}: option {', '.join(empty)} has no text")


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


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", str(text).lower()).split())


def letter_from_answer_text(answer: str, options: dict[str, str]) -> str:
    """The option letter a MedReason ``answer`` names ('' when it cannot be told): the same
    rules prepare uses (medreason.data.recover_letter), so both agree on every gold letter."""
    from medreason.data import recover_letter

    return recover_letter(answer or "", options)


# -- records ---------------------------------------------------------------------------------------
def _field(row: dict[str, Any], fields: dict[str, str], key: str, *fallbacks: str) -> Any:
    if key in fields:
        return row.get(fields[key])
    for name in (key, *fallbacks):
        if name in row:
            return row[name]
    return None


def to_record(
    row: dict[str, Any], fallback_id: str, fmt: str, name: str, fields: dict[str, str], where: str
) -> dict[str, Any]:
    """One benchmark row -> the MedReason record shape (with options_map and answer_letter)."""
    question = _field(row, fields, "question", "QUESTION", "stem")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: no question text; map it with fields: {{question: <column>}}")
    question = question.strip()
    rid = _field(row, fields, "id", "realidx", "id_in_dataset", "pmid", "qid")
    rid = fallback_id if rid is None or str(rid).strip() == "" else str(rid)
    dataset_name = name
    if fmt == "pubmedqa":
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
            inverse = {_norm(v): k for k, v in options.items()}
            raw_gold = inverse.get(_norm(word or ""))
            if raw_gold is None:
                raise InputError(f"{where}: gold answer {word!r} is not one of {', '.join(options.values())}")
        gold = gold_from_index(raw_gold, options, where)
    elif fmt == "medreason":
        options = coerce_options(_field(row, fields, "options"))
        check_options(options, where)
        dataset_name = str(row.get("dataset_name") or name)
        rid = str(row.get("id_in_dataset", rid))
        raw_gold = _field(row, fields, "answer_idx")
        if raw_gold is not None:
            gold = gold_from_index(raw_gold, options, where)
        else:
            gold = letter_from_answer_text(str(_field(row, fields, "answer") or ""), options)
            if not gold:
                raise InputError(
                    f"{where}: cannot tell which option the answer names; add an answer_idx column"
                )
    elif fmt == "mcq":
        options = coerce_options(_field(row, fields, "options", "choices"))
        check_options(options, where)
        gold = gold_from_index(_field(row, fields, "answer_idx", "answer_letter", "label"), options, where)
    else:
        raise InputError(f"{where}: unknown benchmark format {fmt!r}; use mcq, pubmedqa or medreason")
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


def load_benchmark(bench: Any) -> list[dict[str, Any]]:
    """Records of one ``eval.benchmarks`` entry (a BenchmarkConfig), in file order, up to ``limit``."""
    rows = read_rows(bench.path)
    if bench.limit:
        rows = rows[: bench.limit]
    records = []
    for i, (fallback_id, row) in enumerate(rows):
        where = f"benchmark {bench.name!r} ({bench.path}) row {i + 1}"
        records.append(to_record(row, fallback_id, bench.format, bench.name, dict(bench.fields), where))
    if not records:
        raise InputError(f"benchmark {bench.name!r} ({bench.path}) has no rows")
    log.info("benchmark %s: %d questions from %s", bench.name, len(records), bench.path)
    return records
