"""The fast request encoding of likelihood scoring (medreason.loglik) gives exactly the ids of
the tokenizer's own call, and the encoding started ahead (while the model loads) is used as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from medreason.loglik import medqa_prompt

# Varied text: numbers, units, punctuation, non-ASCII, runs of whitespace, the EOS text inside.
PIECES = ["A 45-year-old man", "has 3.5 mg/dL creatinine", "(normal <1.2)", "café-au-lait spots",
          "β-blocker", "  two  spaces", "tabs\there", "line\nbreak", "<|endoftext|> inside", "Answer:",
          "x", "100%", "IL-6 / TNF-α", "—dash", "emoji 🙂"]


def _texts(n: int) -> list[str]:
    return [" ".join(PIECES[(i * 7 + k) % len(PIECES)] for k in range(1 + i % 9)) for i in range(n)]


def _tokenizer(tiny_phi_dir: Path, bos: bool = False) -> Any:
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_phi_dir))
    if bos:  # a tokenizer that adds a BOS itself (Llama-style), to check add_special_tokens both ways
        eos_id = tok.convert_tokens_to_ids(tok.eos_token)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tok.eos_token} $A", special_tokens=[(tok.eos_token, eos_id)])
    return tok


def _reference_pairs(tok: Any, requests: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """lm-eval's encode_pair rule, one request at a time through the tokenizer's own call."""
    def enc(text: str) -> list[int]:
        carries_bos = bool(tok.bos_token and text.startswith(tok.bos_token))
        return list(tok(text, add_special_tokens=not carries_bos)["input_ids"])

    out = []
    for context, continuation in requests:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = enc(context + continuation), enc(context)
        out.append((ctx, whole[len(ctx):]))
    return out


@pytest.mark.parametrize("bos", [False, True])
def test_batch_ids_equal_the_tokenizer_call(tiny_phi_dir: Path, bos: bool) -> None:
    """More texts than one chunk, so several threads encode: same ids, same order."""
    from medreason.loglik import _CHUNK, _backend, _batch_ids

    tok = _tokenizer(tiny_phi_dir, bos)
    assert _backend(tok) is not None  # the fast path is the one under test
    texts = _texts(3 * _CHUNK + 17)
    for special in (True, False):
        assert _batch_ids(tok, texts, special) == [list(x) for x in tok(texts, add_special_tokens=special)["input_ids"]]
    if bos:
        assert _batch_ids(tok, ["x"], True)[0][0] == tok.eos_token_id
        assert _batch_ids(tok, ["x"], False)[0][0] != tok.eos_token_id


def test_backend_with_truncation_falls_back_to_the_call(tiny_phi_dir: Path) -> None:
    """A backend carrying truncation settings is not called directly (the tokenizer's call
    would reset them first): the ids are still the call's, untruncated."""
    from medreason.loglik import _backend, _batch_ids

    tok = _tokenizer(tiny_phi_dir)
    tok.backend_tokenizer.enable_truncation(4)
    assert _backend(tok) is None
    texts = _texts(20)
    ids = _batch_ids(tok, texts, True)
    assert ids == [list(x) for x in tok(texts)["input_ids"]] and max(len(x) for x in ids) > 4


@pytest.mark.parametrize("bos", [False, True])
def test_request_encoding_equals_one_call_per_text(tiny_phi_dir: Path, bos: bool) -> None:
    """The requests of MedQA-shaped questions (shared contexts, text and letter options,
    whitespace-ended and BOS-prefixed contexts) encode to the ids of one tokenizer call per text."""
    from medreason.loglik import _encode_pairs, choice_requests

    tok = _tokenizer(tiny_phi_dir, bos)
    texts = _texts(120)
    questions = [(medqa_prompt(texts[i], {L: texts[(i + k + 1) % len(texts)][:30] for k, L in enumerate("ABCD")}),
                  [texts[(i + k + 1) % len(texts)][:30] for k in range(4)]) for i in range(100)]
    requests = choice_requests(questions) + choice_requests([(q, list("ABCD")) for q, _c in questions[:20]])
    requests += [(questions[0][0] + " ", "B"), (tok.eos_token + questions[1][0], " C"), ("Dose: 5", "0 mg")]
    assert _encode_pairs(tok, requests) == _reference_pairs(tok, requests)


def test_pending_encoding_is_used_only_for_its_requests_and_tokenizer(tiny_phi_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from medreason.loglik import PendingEncoding, _encode_pairs, choice_requests, score_choices

    tok = _tokenizer(tiny_phi_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir), dtype=torch.float32).eval()
    questions = [(medqa_prompt(t, {"A": "aspirin", "B": "β-blocker"}), ["aspirin", "β-blocker"]) for t in _texts(6)]
    requests = choice_requests(questions)
    pending = PendingEncoding(tok, requests)
    assert pending.pairs_for(tok, requests) == _encode_pairs(tok, requests)
    assert pending.pairs_for(tok, requests[:-1]) is None
    assert pending.pairs_for(_tokenizer(tiny_phi_dir), requests) is None  # another tokenizer object
    ahead = score_choices(model, tok, questions, batch_size=2, encoding=pending)
    here = score_choices(model, tok, questions, batch_size=2)
    assert [s.logliks for s in ahead] == [s.logliks for s in here]
    # An option that encodes to no tokens fails where the scores are asked for, as before.
    empty = PendingEncoding(tok, [(questions[0][0], "")])
    with pytest.raises(ValueError, match="encodes to no tokens"):
        empty.pairs_for(tok, [(questions[0][0], "")])
