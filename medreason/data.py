"""MedReason records: loading, validation, answer letters, prompt templates, subsets, splits,
decontamination and tokenization. Plain functions; medreason.prepare calls them in order.
Option letters, gold letters and the text normaliser are medreason.records' (shared with the
benchmark loader); files are read by medreason.sources.

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
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medreason import jsonio
from medreason.errors import InputError
from medreason.records import normalize_text, parse_options, recover_letter
from medreason.sources import read_source

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


# -- small helpers ---------------------------------------------------------------------------------
def uid_of(record: dict[str, Any]) -> str:
    return f"{record['dataset_name']}:{record['id_in_dataset']}"


def stable_hash(*parts: Any) -> int:
    """A 64-bit integer from sha256 over the parts: the same on every machine and Python run
    (unlike hash(), which is salted per process)."""
    blob = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


# -- loading ----------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """What a source file yielded: parsed rows with where each came from, and rows that could
    not even be parsed (bad UTF-8, bad JSON) as rejects; ``provenance`` says where the file came
    from (for a hub file, the commit read)."""

    source: str
    rows: list[tuple[dict[str, Any], Any]] = field(default_factory=list)  # (where, parsed value)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def load_source(source: str, store: Any = None, hub_file: str = "ours_quality_33000.jsonl",
                hub_revision: str | None = None) -> Loaded:
    """Read ``data.source`` into parsed rows (jsonl, json list or parquet, by extension): the
    packaged sample, or any path medreason.sources.read_source reads (local, store URI, hub)."""
    if source == "sample":
        from importlib import resources

        try:
            raw = (resources.files("medreason") / "sample" / SAMPLE_FILE).read_bytes()
        except FileNotFoundError:
            raise InputError(f"data.source=sample: the package has no sample/{SAMPLE_FILE}") from None
        loaded = parse_bytes(raw, SAMPLE_FILE, label=source)
        loaded.provenance = {"kind": "package", "file": SAMPLE_FILE}
        return loaded
    found = read_source(source, store=store, hub_file=hub_file, hub_revision=hub_revision, what="data.source")
    loaded = parse_bytes(found.raw, found.name, label=source)
    loaded.provenance = found.provenance
    return loaded


def parse_bytes(raw: bytes, name: str, label: str | None = None) -> Loaded:
    """Rows of a .jsonl/.ndjson, .json (a list) or .parquet file's bytes, by ``name``'s extension."""
    label = label or name
    lower = name.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return _parse_jsonl(raw, label)
    if lower.endswith(".json"):
        return _parse_json(raw, label)
    if lower.endswith(".parquet"):
        return _parse_parquet(raw, label)
    raise InputError(f"data.source {label}: unsupported file type; use .jsonl, .json or .parquet")


def _parse_jsonl(raw: bytes, label: str) -> Loaded:
    # Decode line by line: one bad line is one rejected record (with its line number), not a
    # failed run.
    out = Loaded(source=label)
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


def _parse_json(raw: bytes, label: str) -> Loaded:
    try:
        rows = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise InputError(f"data.source {label}: not UTF-8 text (byte {exc.start}); "
                         "re-encode the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"data.source {label}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(rows, list):
        raise InputError(f"data.source {label}: expected a JSON list of records")
    return Loaded(source=label, rows=[({"source": label, "index": i}, row) for i, row in enumerate(rows)])


def _parse_parquet(raw: bytes, label: str) -> Loaded:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"data.source {label}: not a readable parquet file ({exc})") from None
    return Loaded(source=label, rows=[({"source": label, "index": i}, row) for i, row in enumerate(table.to_pylist())])


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


# -- answer letters --------------------------------------------------------------------------------
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
            fh.write(jsonio.dumps_line(row) + "\n")
            n += 1
    return n
