"""MedReason records: loading, validation, answer letters, prompt templates, subsets, splits,
decontamination and tokenization. Plain functions; jobs/prepare.py calls them in order.

A MedReason record has six fields (see ../shared/data/PROVENANCE.md for the real data)::

    dataset_name str, id_in_dataset int, question str, options str, reasoning str, answer str

Its uid is "<dataset_name>:<id_in_dataset>". A formatted record (one line of train.jsonl /
eval.jsonl) adds uid, options_map {letter: text}, answer_letter ("" when unknown), prompt and
response (the exact texts that are tokenized).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medreason.errors import InputError

log = logging.getLogger(__name__)

FIELDS: dict[str, type] = {
    "dataset_name": str,
    "id_in_dataset": int,
    "question": str,
    "options": str,
    "reasoning": str,
    "answer": str,
}
TEMPLATES = ("seed", "medreason", "chat")
SAMPLE_FILE = "medreason_sample.jsonl"
# Text the response ends with when the gold letter is known; evaluate's extractor looks for it.
ANSWER_LINE = "\nThe answer is {letter}."
TRUNCATION_MARK = " ..."
_NON_WORD_RE = re.compile(r"[^\w\s]|_")
_APOSTROPHE_RE = re.compile(r"['\u2019`]")


# -- small helpers ---------------------------------------------------------------------------------
def uid_of(record: dict[str, Any]) -> str:
    return f"{record['dataset_name']}:{record['id_in_dataset']}"


def normalize_text(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: "Colle's  ST-elevation." -> 'colles st elevation'.

    Used for duplicate questions, option matching and decontamination, so formatting noise
    (case, punctuation, line breaks) does not hide a repeat.
    """
    # One regex pass (C speed): a per-character unicodedata loop took ~50 s on 32k questions.
    # Apostrophes go ("Colle's" -> "colles"); other punctuation and symbols ("%", "+", "/", "-")
    # become spaces, so "ST-elevation" -> "st elevation".
    text = _APOSTROPHE_RE.sub("", unicodedata.normalize("NFKC", text).lower())
    return " ".join(_NON_WORD_RE.sub(" ", text).split())


def stable_hash(*parts: Any) -> int:
    """A 64-bit integer from sha256 over the parts: the same on every machine and Python run
    (unlike hash(), which is salted per process)."""
    blob = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


# -- loading ----------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """What a source file yielded: parsed rows with where each came from, and rows that could
    not even be parsed (bad UTF-8, bad JSON) as rejects."""

    source: str
    rows: list[tuple[dict[str, Any], Any]] = field(default_factory=list)  # (where, parsed value)
    rejects: list[dict[str, Any]] = field(default_factory=list)


def _read_source_bytes(source: str, hub_file: str, hub_revision: str | None, store: Any) -> tuple[str, bytes]:
    """(file name used to pick the parser, bytes) for ``data.source``."""
    if source == "sample":
        from importlib import resources

        ref = resources.files("medreason") / "sample" / SAMPLE_FILE
        try:
            return SAMPLE_FILE, ref.read_bytes()
        except FileNotFoundError:
            raise InputError(f"data.source=sample: the package has no sample/{SAMPLE_FILE}") from None
    if source.startswith("hub:"):
        repo_id = source[len("hub:"):].strip("/")
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id=repo_id, filename=hub_file, repo_type="dataset",
                                   revision=hub_revision)
        except Exception as exc:  # offline, unreachable, unknown file or revision
            raise InputError(
                f"data.source={source!r}: cannot download {hub_file} from the hub and it is not in "
                f"the local HF cache ({type(exc).__name__}). Copy the file into the store or a local "
                "folder and set data.source to its path"
            ) from None
        with open(path, "rb") as fh:
            return hub_file, fh.read()
    from medreason.store import read_uri_bytes

    if "://" in source:
        try:
            return source, read_uri_bytes(source)
        except FileNotFoundError:
            raise InputError(f"data.source: file not found: {source}") from None
    if os.path.isfile(source):
        with open(source, "rb") as fh:
            return source, fh.read()
    rel = source.strip("/")
    if store is not None and not os.path.isabs(source) and store.exists(rel):
        return source, store.read_bytes(rel)
    where = f" (nor at {store.display(rel)} in the store)" if store is not None and not os.path.isabs(source) else ""
    raise InputError(f"data.source: file not found: {source}{where}; pass a .jsonl/.json/.parquet "
                     "path, 'sample', or 'hub:UCSC-VLAA/MedReason'")


def load_source(source: str, store: Any = None, hub_file: str = "ours_quality_33000.jsonl",
                hub_revision: str | None = None) -> Loaded:
    """Read ``data.source`` into parsed rows (jsonl, json list or parquet, by extension)."""
    name, raw = _read_source_bytes(source, hub_file, hub_revision, store)
    return parse_bytes(raw, name, label=source)


def parse_bytes(raw: bytes, name: str, label: str | None = None) -> Loaded:
    label = label or name
    lower = name.lower()
    out = Loaded(source=label)
    if lower.endswith((".jsonl", ".ndjson")):
        # Decode line by line: one bad line is one rejected record (with its line number), not a
        # failed run.
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            where = {"source": label, "line": lineno}
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte-order mark
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                out.rejects.append({**where, "reason": "invalid_utf8",
                                    "detail": f"byte {exc.start} is not valid UTF-8"})
                continue
            try:
                out.rows.append((where, json.loads(text)))
            except json.JSONDecodeError as exc:
                out.rejects.append({**where, "reason": "invalid_json", "detail": exc.msg})
        return out
    if lower.endswith(".json"):
        try:
            data = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise InputError(f"data.source {label}: not UTF-8 text (byte {exc.start}); "
                             "re-encode the file as UTF-8") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"data.source {label}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise InputError(f"data.source {label}: expected a JSON list of records")
        out.rows = [({"source": label, "index": i}, row) for i, row in enumerate(data)]
        return out
    if lower.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(raw))
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"data.source {label}: not a readable parquet file ({exc})") from None
        out.rows = [({"source": label, "index": i}, row) for i, row in enumerate(table.to_pylist())]
        return out
    raise InputError(f"data.source {label}: unsupported file type; use .jsonl, .json or .parquet")


# -- validation -------------------------------------------------------------------------------------
def check_record(row: Any) -> tuple[str, str] | None:
    """(reason, detail) when a row is not a valid MedReason record, else None."""
    if not isinstance(row, dict):
        return "not_an_object", f"expected a JSON object, got {type(row).__name__}"
    for name, kind in FIELDS.items():
        if name not in row or row[name] is None:
            return f"missing_{name}", f"missing field {name!r}"
        value = row[name]
        # bool is an int subclass; an id of True is a data error, and so is "7131" (a string).
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"wrong_type_{name}", f"{name} must be {kind.__name__}, got {type(value).__name__}"
        if kind is str:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from a "\ud800" escape
                return "invalid_utf8", f"{name} holds text that is not valid UTF-8"
    if not row["dataset_name"].strip():
        return "blank_dataset_name", "dataset_name is blank"
    if not row["question"].strip():
        return "blank_question", "question is blank"
    if not row["answer"].strip():
        return "blank_answer", "answer is blank"
    return None


def duplicate_key(record: dict[str, Any]) -> str:
    """Normalized question + options. The options are part of the key because generic stems
    ("All of the following are true except:") recur in medmcqa with different options: those are
    different items, while the same stem with the same options is a repeat."""
    return normalize_text(record["question"]) + "\x1f" + normalize_text(record["options"])


def validate(loaded: Loaded) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(valid records, rejects). A valid record is the six fields plus ``uid``; the first of
    duplicates (same uid, or same normalized question + options) wins."""
    rejects = list(loaded.rejects)
    valid: list[dict[str, Any]] = []
    seen_uid: dict[str, dict[str, Any]] = {}
    seen_text: dict[str, str] = {}
    for where, row in loaded.rows:
        problem = check_record(row)
        if problem:
            reason, detail = problem
            entry = {**where, "reason": reason, "detail": detail}
            if isinstance(row, dict) and "dataset_name" in row and "id_in_dataset" in row:
                entry["uid"] = f"{row['dataset_name']}:{row['id_in_dataset']}"
            rejects.append(entry)
            continue
        record = {k: row[k] for k in FIELDS}
        uid = uid_of(record)
        if uid in seen_uid:
            rejects.append({**where, "uid": uid, "reason": "duplicate_id",
                            "detail": f"{uid} already seen at {_where_text(seen_uid[uid])}"})
            continue
        key = duplicate_key(record)
        if key in seen_text:
            rejects.append({**where, "uid": uid, "reason": "duplicate_question",
                            "detail": f"same question and options as {seen_text[key]}"})
            continue
        seen_uid[uid] = where
        seen_text[key] = uid
        record["uid"] = uid
        valid.append(record)
    return valid, rejects


def _where_text(where: dict[str, Any]) -> str:
    if "line" in where:
        return f"{where['source']} line {where['line']}"
    if "index" in where:
        return f"{where['source']} [{where['index']}]"
    return str(where.get("source", "?"))


def check_rejects(n_total: int, rejects: Sequence[dict[str, Any]], n_valid: int,
                  max_reject_fraction: float, source: str) -> None:
    """InputError when nothing valid is left or too large a share was rejected."""
    if n_total == 0:
        raise InputError(f"data.source {source}: no records (empty dataset)")
    counts = Counter(r["reason"] for r in rejects)
    summary = ", ".join(f"{k}: {v}" for k, v in counts.most_common())
    first = f"; first: {_where_text(rejects[0])}: {rejects[0].get('detail', rejects[0]['reason'])}" if rejects else ""
    if n_valid == 0:
        raise InputError(f"data.source {source}: all {n_total} records were rejected ({summary}){first}")
    share = len(rejects) / n_total
    if share > max_reject_fraction:
        raise InputError(
            f"data.source {source}: {len(rejects)} of {n_total} records rejected ({share:.0%} > "
            f"data.max_reject_fraction={max_reject_fraction}) ({summary}){first}; fix the data or "
            "raise data.max_reject_fraction"
        )


# -- options and the gold letter --------------------------------------------------------------------
_OPTION_RE = re.compile(r"^\s*\(?([A-Z])\s*[.)]\s?(.*)$")
_DECISION_RE = re.compile(r"^\s*the final decision is\s*:?\s*(yes|no|maybe)\b", re.IGNORECASE)
_PAREN_LETTER_RE = re.compile(r"^\s*\(([A-Z])\)(?:\s+(.*))?$", re.DOTALL)
_LETTER_PREFIX_RE = re.compile(r"^\s*([A-Z])\s*[.):]\s*(.*)$", re.DOTALL)


def parse_options(options: str) -> dict[str, str]:
    """'Answer Choices:\\nA. x\\nB. y' -> {'A': 'x', 'B': 'y'}. Lines that do not start a new
    option continue the previous one; letters must run A, B, C... (a line like 'C. difficile'
    inside option B's text is not option C unless C is the next letter)."""
    out: dict[str, str] = {}
    last: str | None = None
    for line in options.splitlines():
        m = _OPTION_RE.match(line)
        expected = chr(ord("A") + len(out))
        if m and m.group(1) == expected:
            last = m.group(1)
            out[last] = m.group(2).strip()
        elif last is not None and line.strip():
            out[last] = f"{out[last]} {line.strip()}"
    return out


def _starts_with_words(text: str, prefix: str) -> bool:
    return bool(prefix) and text.startswith(prefix) and (len(text) == len(prefix) or text[len(prefix)] == " ")


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
    m = _DECISION_RE.match(answer)
    if m:
        word = m.group(1).lower()
        hits = [k for k, v in norm_opts.items() if v == word]
        return hits[0] if hits else ""
    m = _PAREN_LETTER_RE.match(answer)
    if m and m.group(1) in options_map:
        return m.group(1)
    m = _LETTER_PREFIX_RE.match(answer)
    if m and m.group(1) in options_map and _starts_with_words(normalize_text(m.group(2)), norm_opts[m.group(1)]):
        return m.group(1)
    norm_answer = normalize_text(answer)
    exact = [k for k, v in norm_opts.items() if v and v == norm_answer]
    if exact:
        return exact[0]
    prefixes = sorted((k for k, v in norm_opts.items() if _starts_with_words(norm_answer, v)),
                      key=lambda k: len(norm_opts[k]), reverse=True)
    if prefixes:
        if len(prefixes) > 1 and len(norm_opts[prefixes[0]]) == len(norm_opts[prefixes[1]]) \
                and norm_opts[prefixes[0]] != norm_opts[prefixes[1]]:
            return ""
        return prefixes[0]
    if m and m.group(1) in options_map:
        return m.group(1)
    bare = answer.strip().rstrip(".").strip()
    if len(bare) == 1 and bare in options_map:
        return bare
    return ""


def add_letters(records: Iterable[dict[str, Any]]) -> Counter[str]:
    """Set options_map and answer_letter on each record; count unknown letters per dataset."""
    unknown: Counter[str] = Counter()
    for record in records:
        record["options_map"] = parse_options(record["options"])
        record["answer_letter"] = recover_letter(record["answer"], record["options_map"])
        if not record["answer_letter"]:
            unknown[record["dataset_name"]] += 1
    return unknown


# -- subsets and splits ------------------------------------------------------------------------------
def take_limit(records: Sequence[dict[str, Any]], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """A deterministic subset: the ``limit`` records with the smallest stable hash of
    (seed, "limit", dataset_name, id). The salt "limit" keeps it independent of the split hash
    (with the same hash the smallest values would all land in eval)."""
    if limit is None or limit >= len(records):
        return list(records)
    ranked = sorted(records, key=lambda r: stable_hash(seed, "limit", r["dataset_name"], r["id_in_dataset"]))
    return ranked[:limit]


def split_records(records: Sequence[dict[str, Any]], eval_fraction: float,
                  seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) by a stable hash: a record goes to eval when hash(seed, dataset_name, id)
    / 2**64 < eval_fraction. Each record's side depends only on itself, so adding records never
    moves existing ones. Input order is kept within each side.

    With >= 2 records both sides get at least one: when the hash puts none in eval, the record
    with the smallest hash (the one nearest the threshold) moves to eval; when it puts all in
    eval, the one with the largest hash moves to train. Only tiny datasets are affected (10
    records at 10% have a 0.9**10 = 35% chance of an empty eval side).
    """
    scale = float(2**64)
    scored = [(stable_hash(seed, r["dataset_name"], r["id_in_dataset"]) / scale, i) for i, r in enumerate(records)]
    to_eval = {i for h, i in scored if h < eval_fraction}
    if len(records) >= 2:
        if not to_eval:
            to_eval = {min(scored)[1]}
        elif len(to_eval) == len(records):
            to_eval.discard(max(scored)[1])
    train = [r for i, r in enumerate(records) if i not in to_eval]
    evals = [r for i, r in enumerate(records) if i in to_eval]
    return train, evals


# -- decontamination ---------------------------------------------------------------------------------
# Word n-grams are hashed to 64-bit keys (a polynomial over Python's string hashes, which are
# cached on the word objects) and compared as sorted numpy arrays: 32k questions of ~150 words
# are ~5M n-grams, which as Python tuples in sets took ~15 s on 2 cores and as arrays take ~2 s.
# Keys live only inside one process (str hashes are salted per process); a false match needs a
# 64-bit collision among ~10^13 pairs: p ~ 10^13 / 1.8e19 < 1e-6.
_GRAM_MULT = np.uint64(0x9E3779B97F4A7C15)


def gram_keys(word_lists: Sequence[Sequence[str]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(question index, key) of each word n-gram window of each question, in question order.

    Windows, not distinct n-grams: an 8-word phrase repeated inside one question is rare, and
    de-duplicating 5M keys (a sort) would cost more than the whole rest."""
    import itertools

    lengths = np.fromiter((len(w) for w in word_lists), dtype=np.int64, count=len(word_lists))
    total = int(lengths.sum())
    if total < n:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    flat = np.fromiter(map(hash, itertools.chain.from_iterable(word_lists)), dtype=np.int64,
                       count=total).view(np.uint64)
    m = total - n + 1
    keys = flat[:m].copy()
    for k in range(1, n):  # uint64 arithmetic wraps around, which is what a hash wants
        keys = keys * _GRAM_MULT + flat[k:k + m]
    qid = np.repeat(np.arange(len(word_lists), dtype=np.int64), lengths)
    inside = qid[:m] == qid[n - 1:]  # windows that do not cross into the next question
    return qid[:m][inside], keys[inside]


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(keys.size, dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return sorted_keys[idx] == keys


@dataclass
class BenchmarkIndex:
    """Normalized benchmark questions (exact match) and the n-gram keys of each benchmark."""

    n: int
    exact: dict[str, str] = field(default_factory=dict)
    keys: dict[str, np.ndarray] = field(default_factory=dict)  # benchmark -> sorted keys
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, questions: Iterable[str]) -> None:
        norms = [q for q in (normalize_text(q) for q in questions) if q]
        for norm in norms:
            self.exact.setdefault(norm, name)
        _, keys = gram_keys([q.split() for q in norms], self.n)
        old = self.keys.get(name, np.zeros(0, dtype=np.uint64))
        self.keys[name] = np.sort(np.concatenate([old, keys]))  # sorted for searchsorted
        self.sizes[name] = self.sizes.get(name, 0) + len(norms)


def build_benchmark_index(benchmarks: dict[str, Sequence[str]], n: int) -> BenchmarkIndex:
    index = BenchmarkIndex(n=n)
    for name, questions in benchmarks.items():
        index.add(name, questions)
    return index


def decontaminate(records: Sequence[dict[str, Any]], index: BenchmarkIndex,
                  threshold: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, dropped). A record is dropped when its normalized question equals a benchmark
    question, or when at least ``threshold`` of its word n-grams occur in any benchmark
    question (the share is over the training question's n-grams, so a training stem that is a
    part of a longer benchmark text, e.g. PubMedQA's abstract + question, is caught). Questions
    shorter than n words can only match exactly. The benchmark named is the one holding most of
    the matched n-grams."""
    norms = [normalize_text(r["question"]) for r in records]
    qid, keys = gram_keys([q.split() for q in norms], index.n)
    n_grams = np.bincount(qid, minlength=len(records))
    names = list(index.keys)
    hits = np.zeros((len(names), len(records)))
    union = np.zeros(keys.size, dtype=bool)
    for row, name in enumerate(names):
        member = _member(keys, index.keys[name])
        union |= member
        hits[row] = np.bincount(qid, weights=member, minlength=len(records))
    share = np.bincount(qid, weights=union, minlength=len(records)) / np.maximum(n_grams, 1)
    kept, dropped = [], []
    for i, (record, norm) in enumerate(zip(records, norms, strict=True)):
        hit = index.exact.get(norm)
        if hit is not None:
            dropped.append({"uid": record["uid"], "benchmark": hit, "match": "exact", "share": 1.0})
        elif n_grams[i] and share[i] >= threshold:
            dropped.append({"uid": record["uid"], "benchmark": names[int(hits[:, i].argmax())],
                            "match": "ngram", "share": round(float(share[i]), 3)})
        else:
            kept.append(record)
    return kept, dropped


def benchmark_questions(path: str, question_field: str = "question") -> list[str]:
    """Questions of a benchmark file (MCQ jsonl, PubMedQA, MedReason, ...): the ``question``
    column, with a PubMedQA ``context`` column put before it when present."""
    from medreason.benchmarks import read_rows

    out = []
    for _rid, row in read_rows(path):
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


# -- prompt templates --------------------------------------------------------------------------------
def _letter(record: dict[str, Any]) -> str:
    letter = record.get("answer_letter")
    if letter is None:
        letter = recover_letter(record.get("answer", ""), parse_options(record.get("options", "")))
    return letter or ""


def _question_block(record: dict[str, Any]) -> str:
    options = record.get("options", "")
    return f"{record['question']}\n{options}" if options else record["question"]


def format_prompt(record: dict[str, Any], template: str, tokenizer: Any = None) -> str:
    """The text a model sees before its answer; evaluate builds generation prompts with it.

    seed:      "### question:\\n{question}\\n\\n### option:\\n{options}\\n\\n### answer with reasoning:\\n"
    medreason: "{question}\\n{options}" (just the question when there are no options)
    chat:      the tokenizer's chat template over one user message "{question}\\n{options}",
               with the generation prompt (the assistant turn's opening) appended.
    """
    if template == "seed":
        return (f"### question:\n{record['question']}\n\n"
                f"### option:\n{record.get('options', '')}\n\n"
                "### answer with reasoning:\n")
    if template == "medreason":
        return _question_block(record)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError("data.template=chat needs a tokenizer with a chat template; this model has "
                             "none: use data.template=medreason or seed")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": _question_block(record)}],
            tokenize=False, add_generation_prompt=True,
        )
    raise InputError(f"data.template: unknown template {template!r}; use one of {', '.join(TEMPLATES)}")


def format_response(record: dict[str, Any], template: str) -> str:
    """The target text (EOS is appended as a token, not text).

    seed:            "{reasoning}\\n\\n{answer}"
    medreason, chat: "## Thinking\\n\\n{reasoning}\\n\\n## Final Answer\\n\\n{answer}"
    Both end with "\\nThe answer is X." when the gold letter X is known.
    """
    if template == "seed":
        text = f"{record['reasoning']}\n\n{record['answer']}"
    elif template in ("medreason", "chat"):
        text = f"## Thinking\n\n{record['reasoning']}\n\n## Final Answer\n\n{record['answer']}"
    else:
        raise InputError(f"data.template: unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    letter = _letter(record)
    return text + ANSWER_LINE.format(letter=letter) if letter else text


def prompt_add_special_tokens(template: str) -> bool:
    """Whether prompt text is tokenized with the tokenizer's special tokens (e.g. a BOS).
    The chat template already writes them as text, so adding them again would double the BOS."""
    return template != "chat"


def encode_prompt(tokenizer: Any, prompt: str, template: str) -> list[int]:
    """Prompt token ids exactly as prepare makes them (evaluate uses this for generation)."""
    return list(tokenizer(prompt, add_special_tokens=prompt_add_special_tokens(template))["input_ids"])


# -- tokenization ------------------------------------------------------------------------------------
@dataclass
class TokenizeSettings:
    template: str
    max_len_tokens: int
    overlong_policy: str
    train_on_prompt: bool


@dataclass
class Encoded:
    """One formatted + tokenized record. status: ok | truncated | overlong | overlong_prompt."""

    uid: str
    prompt: str
    response: str
    ids: np.ndarray
    prompt_len: int
    status: str
    n_tokens_full: int


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_dir: str, trust_remote_code: bool) -> None:
    global _WORKER_TOKENIZER
    from transformers import AutoTokenizer

    _WORKER_TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code)


def _encode_chunk_in_worker(args: tuple[list[dict[str, Any]], TokenizeSettings]) -> list[Encoded]:
    records, settings = args
    return encode_records(records, _WORKER_TOKENIZER, settings)


def encode_records(records: Sequence[dict[str, Any]], tokenizer: Any, settings: TokenizeSettings) -> list[Encoded]:
    """Format and tokenize records in one batch: ids = prompt ids + response ids + EOS.

    Prompt and response are tokenized separately so the boundary is exact (no token straddles
    it) and only the prompt gets special tokens. Over-long records follow the policy:
      truncate: keep the prompt and the response's end ("## Final Answer ... The answer is X.")
                and cut the reasoning's end, marked with " ..."; EOS stays. A record whose prompt
                and answer alone do not fit is "overlong_prompt" (dropped).
      drop / error: marked "overlong" (the caller rejects it or stops).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no EOS token; prepare appends EOS to every record")
    prompts = [format_prompt(r, settings.template, tokenizer) for r in records]
    responses = [format_response(r, settings.template) for r in records]
    add_special = prompt_add_special_tokens(settings.template)
    prompt_ids = batch_ids(tokenizer, prompts, add_special)
    response_ids = batch_ids(tokenizer, responses, False)
    out = []
    for record, prompt, response, p_ids, r_ids in zip(records, prompts, responses, prompt_ids, response_ids,
                                                      strict=True):
        n_full = len(p_ids) + len(r_ids) + 1
        status = "ok"
        if n_full > settings.max_len_tokens:
            if settings.overlong_policy == "truncate":
                cut = _truncate_reasoning(record, len(p_ids), tokenizer, settings)
                if cut is None:
                    status = "overlong_prompt"
                else:
                    response, r_ids = cut
                    status = "truncated"
            else:
                status = "overlong"
        ids = np.asarray([*p_ids, *r_ids, eos], dtype=np.int32)
        prompt_len = 0 if settings.train_on_prompt else len(p_ids)
        out.append(Encoded(record["uid"], prompt, response, ids, prompt_len, status, n_full))
    return out


def batch_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of a batch of texts, the same as ``tokenizer(texts)["input_ids"]``.

    Goes straight to the Rust tokenizer's encode_batch_fast (no offsets, no attention masks, no
    BatchEncoding) when it has one and no truncation/padding is configured on it: ~20% less CPU,
    and tokenizing is nearly all of prepare's time (~19M tokens for the full dataset)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None and backend.truncation is None and backend.padding is None:
        return [e.ids for e in fast(texts, add_special_tokens=add_special_tokens)]
    return tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]


def _truncate_reasoning(record: dict[str, Any], n_prompt: int, tokenizer: Any,
                        settings: TokenizeSettings) -> tuple[str, list[int]] | None:
    """Shorten the reasoning until prompt + response + EOS fits max_len_tokens."""
    budget = settings.max_len_tokens - n_prompt - 1
    skeleton = format_response({**record, "reasoning": TRUNCATION_MARK.strip()}, settings.template)
    fixed = len(tokenizer(skeleton, add_special_tokens=False)["input_ids"])
    if fixed > budget:
        return None
    reasoning_ids = tokenizer(record["reasoning"], add_special_tokens=False)["input_ids"]
    keep = min(len(reasoning_ids), budget - fixed)
    # Decoding a cut and re-encoding can merge tokens differently across the new seams; shrink
    # by a few tokens until the whole response fits (one or two rounds in practice).
    while keep >= 0:
        head = tokenizer.decode(reasoning_ids[:keep], skip_special_tokens=True).rstrip()
        response = format_response({**record, "reasoning": head + TRUNCATION_MARK}, settings.template)
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(ids) <= budget:
            return response, list(ids)
        keep -= max(1, len(ids) - budget)
    return None


def resolve_num_proc(num_proc: int) -> int:
    return num_proc or (os.cpu_count() or 1)


def tokenize_split(records: Sequence[dict[str, Any]], settings: TokenizeSettings, *,
                   tokenizer: Any = None, tokenizer_dir: str | None = None, trust_remote_code: bool = False,
                   num_proc: int = 1, chunk_size: int = 512, desc: str = "tokenize") -> list[Encoded]:
    """Format and tokenize records, in chunks, in ``num_proc`` worker processes when that pays
    (>= 2 workers and more than 4 chunks); otherwise in this process, where the Rust tokenizer
    still batches each chunk. Results keep the input order."""
    from tqdm.auto import tqdm

    chunks = [list(records[i:i + chunk_size]) for i in range(0, len(records), chunk_size)]
    results: list[Encoded] = []
    bar = tqdm(total=len(records), desc=desc, unit="rec", disable=None)
    try:
        if num_proc >= 2 and len(chunks) > 4 and tokenizer_dir is not None:
            import multiprocessing as mp

            # fork: workers inherit the imported modules (transformers takes seconds to import);
            # each loads the tokenizer from tokenizer.json once (~0.3 s).
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer_dir, trust_remote_code)) as pool:
                for part in pool.imap(_encode_chunk_in_worker, [(c, settings) for c in chunks]):
                    results.extend(part)
                    bar.update(len(part))
        else:
            if tokenizer is None:
                if tokenizer_dir is None:
                    raise ValueError("tokenize_split needs a tokenizer or a tokenizer_dir")
                _init_worker(tokenizer_dir, trust_remote_code)
                tokenizer = _WORKER_TOKENIZER
            for chunk in chunks:
                results.extend(encode_records(chunk, tokenizer, settings))
                bar.update(len(chunk))
    finally:
        bar.close()
    return results


def formatted_record(record: dict[str, Any], encoded: Encoded) -> dict[str, Any]:
    """One line of train.jsonl / eval.jsonl."""
    return {
        "uid": record["uid"],
        "dataset_name": record["dataset_name"],
        "id_in_dataset": record["id_in_dataset"],
        "question": record["question"],
        "options": record["options"],
        "options_map": record["options_map"],
        "reasoning": record["reasoning"],
        "answer": record["answer"],
        "answer_letter": record["answer_letter"],
        "prompt": encoded.prompt,
        "response": encoded.response,
    }


def length_percentiles(lengths: Sequence[int] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99/max/mean of token lengths (zeros for an empty split)."""
    arr = np.asarray(lengths, dtype=np.float64)
    if arr.size == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1),
            "max": int(arr.max()), "mean": round(float(arr.mean()), 1)}


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
