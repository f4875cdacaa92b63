"""Likelihood scoring of multiple-choice questions, the way lm-evaluation-harness scores them.

No generation: each option is a continuation of the question, and the model's summed
log-probability of the continuation's tokens decides. This is what leaderboards report for
MedQA (lm-eval's ``medqa_4options``), so numbers from here are comparable to theirs.

The conventions copied from lm-eval (``lm_eval/api/model.py`` ``_encode_pair`` and
``lm_eval/api/task.py`` ``process_results`` for ``output_type: multiple_choice``):

- A request is ``(context, target_delimiter + choice)``, ``target_delimiter`` = " ".
- Trailing whitespace of the context moves to the front of the continuation; then
  ``context + continuation`` is encoded as ONE string and split at the token length of the
  encoded context alone. Encoding the two separately would differ wherever a token spans the
  boundary (BPE merges " A" into one token, which is not "" + "A").
- The tokenizer's own special-token default applies (a BOS where the tokenizer adds one),
  except that a string already starting with the BOS text gets none added.
- An empty context is replaced by the BOS token (EOS when there is none).
- ``acc`` picks the argmax of the summed log-likelihoods; ``acc_norm`` divides each by the
  choice's length in characters (``len(choice)``, lm-eval's ``completion_len``, without the
  delimiter); ``acc_bytes`` by its UTF-8 length. Ties go to the first option, like np.argmax.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

TARGET_DELIMITER = " "
MEDQA_CHOICES = ("A", "B", "C", "D")

log = logging.getLogger(__name__)


def medqa_prompt(question: str, options: dict[str, str]) -> str:
    """The context of lm-eval's ``medqa_4options`` task (its ``preprocess_medqa.doc_to_text``);
    options in the mapping's order, so a 5-option question keeps the same layout."""
    answers = "".join(f"{k}. {v}\n" for k, v in options.items())
    return f"Question: {question}\n{answers}Answer:"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return _encode_many(tokenizer, [text])[0]


def prefix_token_id(tokenizer: Any) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _moved_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: the context's trailing whitespace moves to the front of the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split as lm-eval splits them for a causal model."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    context, continuation = _moved_whitespace(context, continuation)
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of every text with the tokenizer's own special-token default, except that a
    text already starting with the BOS text gets none added (``_batch_ids`` does the calls)."""
    bos = getattr(tokenizer, "bos_token", None)
    out: list[list[int]] = [[] for _ in texts]
    for carries_bos in (True, False):
        idx = [i for i, t in enumerate(texts) if bool(bos and t.startswith(bos)) == carries_bos]
        if idx:
            for i, ids in zip(idx, _batch_ids(tokenizer, [texts[i] for i in idx], not carries_bos), strict=True):
                out[i] = ids
    return out


# Texts per backend call when encoding in threads: small enough to spread over every core,
# large enough that the per-call cost stays negligible.
_CHUNK = 256


def _backend(tokenizer: Any) -> Any:
    """The Rust tokenizer that ``tokenizer(texts)`` would call with exactly this state, or None
    (a slow tokenizer, a class with its own encoding, or a backend holding truncation/padding
    settings that transformers would reset first)."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # an older transformers: keep its own call
        return None
    if not isinstance(tokenizer, TokenizersBackend):
        return None
    # A subclass that changes any step of the call (its own pre-processing) keeps the call.
    for step in ("__call__", "_call_one", "_encode_plus"):
        if getattr(type(tokenizer), step, None) is not getattr(TokenizersBackend, step, None):
            return None
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None:
        return None
    if bool(backend.encode_special_tokens) != bool(tokenizer.split_special_tokens):
        return None
    return backend


def _batch_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=...)["input_ids"]``, the same ids, faster: a fast
    tokenizer's backend is called directly (no offsets or attention masks built) on chunks in a
    thread pool. The backend releases the GIL while encoding, so the chunks run on every core
    even with TOKENIZERS_PARALLELISM=false (which only stops the backend's own thread pool, the
    one that is unsafe across fork), and encoding overlaps other Python work (model loading)."""
    backend = _backend(tokenizer)
    if backend is None:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    chunks = [texts[i:i + _CHUNK] for i in range(0, len(texts), _CHUNK)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(len(chunks), cores)

    def encode(chunk: list[str]) -> list[list[int]]:
        return [enc.ids for enc in backend.encode_batch_fast(chunk, add_special_tokens=add_special_tokens)]

    if workers <= 1:
        return [ids for chunk in chunks for ids in encode(chunk)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="encode") as pool:
        return [ids for part in pool.map(encode, chunks) for ids in part]


def loglikelihoods(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    padding_side: Literal["right", "left"] = "right",
    max_length: int | None = None,
    shared_context: bool = True,
    max_batch_tokens: int | None = None,
    pairs: Sequence[tuple[list[int], list[int]]] | None = None,
) -> list[tuple[float, bool]]:
    """(summed log-likelihood, is_greedy) of each ``(context, continuation)`` request.

    ``pairs``: the requests' (context ids, continuation ids) as ``_encode_pairs`` gives them,
    when they were encoded ahead (``PendingEncoding``); None encodes them here.

    ``shared_context`` (default): requests with identical context ids (the options of one
    question) share one packed row, so the context runs once (``medreason.loglik_shared``);
    ``batch_size`` packed rows per forward pass, fewer where rows x row length would pass
    ``max_batch_tokens``. Groups that the plain path would truncate, and every request of a
    model whose attention takes no custom mask (FlashAttention), take the plain path.

    The plain path: one row per request, batched forward passes without generation. Rows are
    sorted by length (longest first) so a batch pads little. Position ids come from the
    attention mask, so left padding gives the same numbers as right padding: a left-padded
    row's first real token is at position 0, not at the number of pads before it.
    ``max_length`` (default: the model's ``max_position_embeddings``) keeps the last
    max_length + 1 tokens of a long request, as lm-eval truncates from the left.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if pairs is not None and len(pairs) != len(requests):
        raise ValueError(f"{len(pairs)} encoded pairs for {len(requests)} requests")
    if not shared_context:
        return _plain_loglikelihoods(model, tokenizer, requests, batch_size, padding_side, max_length, pad_id, pairs)
    return _shared_loglikelihoods(model, tokenizer, requests, batch_size, padding_side, max_length, pad_id,
                                  max_batch_tokens, pairs)


def _shared_loglikelihoods(model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], batch_size: int,
                           padding_side: Literal["right", "left"], max_length: int, pad_id: int,
                           max_batch_tokens: int | None,
                           pairs: Sequence[tuple[list[int], list[int]]] | None) -> list[tuple[float, bool]]:
    from medreason.loglik_shared import MASKABLE_ATTENTION, plan_rows, score_rows

    started = time.monotonic()
    pairs = _encode_pairs(tokenizer, requests) if pairs is None else pairs
    encoded = time.monotonic()
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in MASKABLE_ATTENTION:
        rows, plain = plan_rows(pairs, max_length)
    else:
        log.info("attention %r takes no custom mask: every option scored in a row of its own", impl)
        rows, plain = [], list(range(len(requests)))
    out = score_rows(model, rows, len(requests), pad_id, batch_size, max_batch_tokens)
    if plain:
        alone = _plain_loglikelihoods(model, tokenizer, [requests[i] for i in plain], batch_size,
                                      padding_side, max_length, pad_id, [pairs[i] for i in plain])
        for i, result in zip(plain, alone, strict=True):
            out[i] = result
    log.info("likelihood scoring: %d requests (%d rows, %d tokens) in %.1f s, %.1f s of it encoding "
             "(or waiting for the encoding started ahead)", len(requests),
             len(rows), sum(r.length for r in rows), time.monotonic() - started, encoded - started)
    done = [r for r in out if r is not None]
    if len(done) != len(requests):
        raise RuntimeError(f"{len(requests) - len(done)} of {len(requests)} requests were not scored")
    return done


def _plain_loglikelihoods(model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], batch_size: int,
                          padding_side: str, max_length: int, pad_id: int,
                          pairs: Sequence[tuple[list[int], list[int]]] | None = None) -> list[tuple[float, bool]]:
    """One row per request: context + continuation each time (``shared_context=False``)."""
    import torch

    device = next(model.parameters()).device
    encoded = _model_inputs(_encode_pairs(tokenizer, requests) if pairs is None else pairs, max_length)

    out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        batch = [encoded[i] for i in order[start:start + batch_size]]
        ids, mask, spans = _pad_batch(batch, pad_id, padding_side)
        width = ids.shape[1]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        # Only the positions that predict a continuation need logits: the others would cost a
        # [rows x width x vocab] float32 tensor (16 x 400 x 49152 x 4 B = 1.3 GB for SmolLM2)
        # and its log-softmax. ``first`` is the earliest such position in the batch.
        first = min(span - len(cont) for span, (_inp, cont) in zip(spans, batch, strict=True))
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), logits_to_keep=width - first).logits
        logprobs = torch.log_softmax(logits[:, -(width - first):].float(), dim=-1)
        for row, i in enumerate(order[start:start + batch_size]):
            cont = encoded[i][1]
            end = spans[row] - first
            part = logprobs[row, end - len(cont):end]
            target = torch.tensor(cont, dtype=torch.long, device=part.device)
            out[i] = (float(part.gather(1, target[:, None]).sum()), bool((part.argmax(dim=-1) == target).all()))
    return out


def _model_inputs(pairs: Sequence[tuple[list[int], list[int]]],
                  max_length: int) -> list[tuple[list[int], list[int]]]:
    """(model input, continuation tokens) per request: the model reads every token but the last,
    and the last len(cont) logits predict cont; a long request keeps its last max_length + 1."""
    encoded = []
    for ctx, cont in pairs:
        full = (ctx + cont)[-(max_length + 1):]
        encoded.append((full[:-1], cont[-len(full) + 1:] if len(cont) >= len(full) else cont))
    return encoded


def _encode_pairs(tokenizer: Any, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per request, as ``encode_pair`` gives them; an empty
    continuation is an error. The options of a question share their context, so each distinct
    context is encoded once, and all strings in batches."""
    moved = [_moved_whitespace(c, x) if c else (c, x) for c, x in requests]
    contexts = sorted({c for c, _x in moved if c})
    ctx_ids = dict(zip(contexts, _encode_many(tokenizer, contexts), strict=True))
    with_ctx = [i for i, (c, _x) in enumerate(moved) if c]
    wholes = dict(zip(with_ctx, _encode_many(tokenizer, [moved[i][0] + moved[i][1] for i in with_ctx]), strict=True))
    pairs = []
    for i, (context, continuation) in enumerate(requests):
        if moved[i][0]:
            ctx = ctx_ids[moved[i][0]]
            pair = (ctx, wholes[i][len(ctx):])
        else:
            pair = encode_pair(tokenizer, context, continuation)
        if not pair[1]:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
        pairs.append(pair)
    return pairs


def _pad_batch(batch: list[tuple[list[int], list[int]]], pad_id: int,
               padding_side: str) -> tuple[Any, Any, list[int]]:
    """Padded input ids, attention mask, and one past each row's last real position."""
    import torch

    width = max(len(inp) for inp, _cont in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    spans = []
    for row, (inp, _cont) in enumerate(batch):
        begin = 0 if padding_side == "right" else width - len(inp)
        ids[row, begin:begin + len(inp)] = torch.tensor(inp, dtype=torch.long)
        mask[row, begin:begin + len(inp)] = 1
        spans.append(begin + len(inp))
    return ids, mask, spans


def _argmax(values: Sequence[float]) -> int:
    """The first index of the maximum (np.argmax's tie rule); NaN never wins."""
    best = 0
    for i, v in enumerate(values):
        if not math.isnan(v) and (math.isnan(values[best]) or v > values[best]):
            best = i
    return best


@dataclass
class ChoiceScores:
    """One question's option log-likelihoods and the option each lm-eval metric picks."""

    logliks: list[float]
    is_greedy: list[bool]
    pred: int  # acc: argmax of the summed log-likelihood
    pred_norm: int  # acc_norm: argmax of log-likelihood / len(choice) (characters)
    pred_bytes: int  # acc_bytes: argmax of log-likelihood / UTF-8 bytes of the choice


def pick(logliks: Sequence[float], choices: Sequence[str]) -> tuple[int, int, int]:
    """(acc, acc_norm, acc_bytes) picks from the options' summed log-likelihoods."""
    chars = [float(len(c)) for c in choices]
    nbytes = [float(len(c.encode("utf-8"))) for c in choices]
    if min(chars, default=1.0) == 0:
        raise ValueError("an empty choice cannot be length-normalized")
    return (_argmax(logliks), _argmax([ll / n for ll, n in zip(logliks, chars, strict=True)]),
            _argmax([ll / n for ll, n in zip(logliks, nbytes, strict=True)]))


def choice_requests(questions: Sequence[tuple[str, Sequence[str]]],
                    target_delimiter: str = TARGET_DELIMITER) -> list[tuple[str, str]]:
    """The ``(context, delimiter + choice)`` request of every option of every question, in order."""
    return [(ctx, f"{target_delimiter}{c}") for ctx, choices in questions for c in choices]


def score_choices(
    model: Any,
    tokenizer: Any,
    questions: Sequence[tuple[str, Sequence[str]]],
    target_delimiter: str = TARGET_DELIMITER,
    batch_size: int = 8,
    padding_side: Literal["right", "left"] = "right",
    max_length: int | None = None,
    shared_context: bool = True,
    max_batch_tokens: int | None = None,
    encoding: PendingEncoding | None = None,
) -> list[ChoiceScores]:
    """Score ``[(context, choices)]``: every option of every question in one batched pass
    (``loglikelihoods`` says what ``shared_context`` and ``max_batch_tokens`` do). ``encoding``:
    the requests' encoding started ahead, used when it is of these requests with this tokenizer."""
    requests = choice_requests(questions, target_delimiter)
    pairs = encoding.pairs_for(tokenizer, requests) if encoding is not None else None
    results = loglikelihoods(model, tokenizer, requests, batch_size=batch_size,
                             padding_side=padding_side, max_length=max_length,
                             shared_context=shared_context, max_batch_tokens=max_batch_tokens, pairs=pairs)
    out, k = [], 0
    for _ctx, choices in questions:
        part = results[k:k + len(choices)]
        k += len(choices)
        lls = [ll for ll, _ in part]
        pred, pred_norm, pred_bytes = pick(lls, choices)
        out.append(ChoiceScores(logliks=lls, is_greedy=[g for _, g in part], pred=pred,
                                pred_norm=pred_norm, pred_bytes=pred_bytes))
    return out


def loglik_questions(items: Sequence[tuple[str, dict[str, Any]]],
                     choices: Literal["text", "letter"] = "text") -> list[tuple[str, list[str]]]:
    """``[(lm-eval's medqa prompt, choices)]`` of ``[(set name, record)]`` (``loglik_rows``)."""
    questions = []
    for _set, rec in items:
        options = rec["options_map"]
        questions.append((medqa_prompt(rec["question"], options),
                          list(options) if choices == "letter" else list(options.values())))
    return questions


class PendingEncoding:
    """The encoding of likelihood requests, run in a background thread: the tokenizer is loaded
    before the model, so the requests can be encoded while the model loads (seconds on a GPU
    host, where loading takes longer still). The tokenizer backend releases the GIL, so loading
    and encoding overlap for real."""

    def __init__(self, tokenizer: Any, requests: Sequence[tuple[str, str]]) -> None:
        from medreason.background import in_background

        self.tokenizer = tokenizer
        self.requests = list(requests)
        self._started = time.monotonic()
        self._future = in_background("loglik-encode", self._run)

    def _run(self) -> list[tuple[list[int], list[int]]]:
        pairs = _encode_pairs(self.tokenizer, self.requests)
        log.info("likelihood requests: %d encoded in %.1f s (in the background)", len(pairs),
                 time.monotonic() - self._started)
        return pairs

    def pairs_for(self, tokenizer: Any, requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]] | None:
        """The encoded pairs (waiting for them if need be) when they are of ``requests`` with
        ``tokenizer``; else None. An encoding error (an option that encodes to no tokens) is
        raised here, as it would be raised by encoding on the spot."""
        if tokenizer is not self.tokenizer or list(requests) != self.requests:
            return None
        return self._future.result()


def loglik_rows(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[str, dict[str, Any]]],
    model_label: str,
    choices: Literal["text", "letter"] = "text",
    batch_size: int = 8,
    shared_context: bool = True,
    max_batch_tokens: int | None = None,
    encoding: PendingEncoding | None = None,
) -> list[dict[str, Any]]:
    """Rows in the evaluate stage's predictions.jsonl format for ``[(set name, record)]``, the
    records with ``question``, ``options_map`` and ``answer_letter``; every option of every
    question is scored in one batched pass.

    The context is lm-eval's medqa prompt; each option's continuation is its text
    (``choices="text"``) or its letter (``"letter"``: lm-eval's ``medqa_4options`` exactly).
    ``extracted`` is the ``acc`` pick and ``extracted_norm`` the ``acc_norm`` pick (divided by
    the continuation's length in characters). A likelihood pick always names an option, so
    there are no parse failures; ``logliks`` keeps each option's score for later analysis.
    ``encoding``: ``PendingEncoding(tokenizer, choice_requests(loglik_questions(items, choices)))``
    started ahead, or None.
    """
    questions = loglik_questions(items, choices)
    scores = score_choices(model, tokenizer, questions, batch_size=batch_size, shared_context=shared_context,
                           max_batch_tokens=max_batch_tokens, encoding=encoding)
    rows = []
    for (set_name, rec), (prompt, _), sc in zip(items, questions, scores, strict=True):
        letters = list(rec["options_map"])
        gold = rec["answer_letter"]
        letter, letter_norm = letters[sc.pred], letters[sc.pred_norm]
        rows.append({
            "model": model_label, "set": set_name, "id": rec["uid"],
            "source": rec.get("dataset_name", set_name), "prompt": prompt, "generated": "",
            "extracted": letter, "gold": gold, "correct": letter == gold,
            "extracted_norm": letter_norm, "correct_norm": letter_norm == gold,
            "parse_method": f"loglikelihood:{choices}",
            "logliks": dict(zip(letters, sc.logliks, strict=True)),
        })
    return rows


def prediction_rows(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    model_label: str,
    set_name: str,
    choices: Literal["text", "letter"] = "letter",
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """``loglik_rows`` for the records of one set (letters as choices by default, as
    lm-eval's ``medqa_4options``)."""
    return loglik_rows(model, tokenizer, [(set_name, r) for r in records], model_label,
                       choices=choices, batch_size=batch_size)
