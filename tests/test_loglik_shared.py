"""Shared-context likelihood scoring (medreason.loglik_shared) against the plain path.

The plain path (``shared_context=False``) is the one checked against lm-evaluation-harness in
test_loglik.py; here the packed rows must give its numbers for every request. Tolerance: abs
1e-4 on summed log-likelihoods in float32, since the two paths run the same weights over
different row shapes (packed vs one row per option, other padding), so attention and matmul
kernels reduce in a different order; observed differences are a few 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medreason.loglik import loglikelihoods, medqa_prompt, score_choices

TOL = 1e-4

QUESTIONS = [
    ("A 54-year-old man has crushing chest pain radiating to the left arm. Most likely diagnosis?",
     ["Acute myocardial infarction with ST elevation", "Gout", "Community-acquired pneumonia", "Migraine"]),
    ("A child has a barking cough and inspiratory stridor. Which virus is the usual cause?",
     ["Parainfluenza virus", "HIV", "Rabies virus", "Hepatitis B virus"]),
    ("Which vitamin deficiency causes scurvy?", ["Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D"]),
]


def _load(model_dir: Path, attn: str = "sdpa"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def _requests() -> list[tuple[str, str]]:
    reqs = [(medqa_prompt(q, dict(zip("ABCD", opts, strict=True))), f" {o}") for q, opts in QUESTIONS for o in opts]
    # A group of one request, and a continuation of one token (a letter, as medqa_4options).
    reqs.append(("Short context with a single option:", " a much longer continuation of several words"))
    reqs.append((medqa_prompt(QUESTIONS[0][0], dict(zip("ABCD", QUESTIONS[0][1], strict=True))), " B"))
    return reqs


def _assert_same(got: list[tuple[float, bool]], want: list[tuple[float, bool]]) -> None:
    assert len(got) == len(want)
    for (ll, greedy), (ll_want, greedy_want) in zip(got, want, strict=True):
        assert ll == pytest.approx(ll_want, abs=TOL)
        assert greedy == greedy_want


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_context_gives_the_plain_numbers(tiny_phi_dir: Path, attn: str) -> None:
    from medreason.loglik import encode_pair
    from medreason.loglik_shared import plan_rows

    model, tokenizer = _load(tiny_phi_dir, attn)
    reqs = _requests()
    pairs = [encode_pair(tokenizer, c, k) for c, k in reqs]
    assert len({len(k) for _c, k in pairs}) > 2 and min(len(k) for _c, k in pairs) == 1
    rows, plain = plan_rows(pairs, 2048)
    assert not plain and sorted(len(r.conts) for r in rows) == [1, 4, 4, 5]  # " B" joins question 1
    for side in ("right", "left"):
        want = loglikelihoods(model, tokenizer, reqs, batch_size=3, padding_side=side, shared_context=False)
        _assert_same(loglikelihoods(model, tokenizer, reqs, batch_size=3, padding_side=side), want)
    want = loglikelihoods(model, tokenizer, reqs, batch_size=1, shared_context=False)
    _assert_same(loglikelihoods(model, tokenizer, reqs, batch_size=1), want)
    # One row per batch through the token cap, all rows in one batch without it.
    _assert_same(loglikelihoods(model, tokenizer, reqs, batch_size=8, max_batch_tokens=10), want)
    _assert_same(loglikelihoods(model, tokenizer, reqs, batch_size=8), want)


def test_same_picks_per_question(tiny_phi_dir: Path) -> None:
    model, tokenizer = _load(tiny_phi_dir)
    questions = [(medqa_prompt(q, dict(zip("ABCD", opts, strict=True))), opts) for q, opts in QUESTIONS]
    shared = score_choices(model, tokenizer, questions, batch_size=2)
    plain = score_choices(model, tokenizer, questions, batch_size=2, shared_context=False)
    for s, p in zip(shared, plain, strict=True):
        assert s.logliks == pytest.approx(p.logliks, abs=TOL)
        assert (s.pred, s.pred_norm, s.pred_bytes) == (p.pred, p.pred_norm, p.pred_bytes)


def test_truncated_groups_take_the_plain_path(tiny_phi_dir: Path) -> None:
    from medreason.loglik import encode_pair
    from medreason.loglik_shared import plan_rows

    model, tokenizer = _load(tiny_phi_dir)
    long_ctx = medqa_prompt(QUESTIONS[0][0], dict(zip("ABCD", QUESTIONS[0][1], strict=True)))
    reqs = [(long_ctx, f" {o}") for o in QUESTIONS[0][1]] + [("Which vitamin?", f" {o}") for o in QUESTIONS[2][1]]
    pairs = [encode_pair(tokenizer, c, k) for c, k in reqs]
    max_length = len(pairs[0][0]) - 5  # the long question's context alone passes it
    assert max(len(c) + len(k) for c, k in pairs[4:]) <= max_length
    rows, plain = plan_rows(pairs, max_length)
    assert plain == [0, 1, 2, 3] and [i for i, _ in rows[0].conts] == [4, 5, 6, 7]
    want = loglikelihoods(model, tokenizer, reqs, batch_size=1, max_length=max_length, shared_context=False)
    got = loglikelihoods(model, tokenizer, reqs, batch_size=1, max_length=max_length)
    assert got[:4] == want[:4]  # the very same computation
    _assert_same(got[4:], want[4:])
    # Without the cap nothing is truncated and the long question's numbers change.
    untruncated = loglikelihoods(model, tokenizer, reqs[:4], batch_size=1)
    assert all(abs(a - b) > 1e-3 for (a, _), (b, _) in zip(untruncated, want[:4], strict=True))


def test_a_long_group_is_split_over_rows(tiny_phi_dir: Path) -> None:
    from medreason.loglik import encode_pair
    from medreason.loglik_shared import plan_rows

    model, tokenizer = _load(tiny_phi_dir)
    reqs = [("Name a fruit:", f" {w} and some more words after it") for w in ("apple", "pear", "plum", "fig")]
    pairs = [encode_pair(tokenizer, c, k) for c, k in reqs]
    max_length = len(pairs[0][0]) + 2 * max(len(k) for _c, k in pairs)
    rows, plain = plan_rows(pairs, max_length)
    assert not plain and len(rows) >= 2 and all(r.length <= max_length for r in rows)
    want = loglikelihoods(model, tokenizer, reqs, batch_size=4, max_length=max_length, shared_context=False)
    _assert_same(loglikelihoods(model, tokenizer, reqs, batch_size=4, max_length=max_length), want)


def test_the_mask_keeps_continuations_apart(tiny_phi_dir: Path) -> None:
    import torch

    from medreason.loglik import encode_pair
    from medreason.loglik_shared import PackedRow, layout, score_rows, shared_mask

    model, tokenizer = _load(tiny_phi_dir)
    ctx = medqa_prompt(QUESTIONS[1][0], dict(zip("ABCD", QUESTIONS[1][1], strict=True)))
    ids, cont_a = encode_pair(tokenizer, ctx, " Parainfluenza virus")
    _, cont_b = encode_pair(tokenizer, ctx, " Rabies virus")
    _, cont_c = encode_pair(tokenizer, ctx, " Hepatitis B virus of the liver")
    first = score_rows(model, [PackedRow(ids, [(0, cont_b), (1, cont_a)])], 2, 0, 1, None)
    other = score_rows(model, [PackedRow(ids, [(0, cont_c), (1, cont_a)])], 2, 0, 1, None)
    assert first[1][0] == pytest.approx(other[1][0], abs=1e-6)  # A after B or after C: the same
    assert abs(first[0][0] - other[0][0]) > 1e-3  # B and C themselves differ
    # The model does read earlier tokens: A right after B's tokens, unmasked, scores otherwise.
    after_b = loglikelihoods(model, tokenizer, [(ctx + " Rabies virus", " Parainfluenza virus")],
                             shared_context=False)
    assert abs(after_b[0][0] - first[1][0]) > 1e-3
    # And the mask itself: no continuation column reads another's, padding reads no real token.
    lay = layout([PackedRow(ids, [(0, cont_b), (1, cont_a)]), PackedRow(ids[:5], [(2, cont_b)])], 0)
    mask = shared_mask(lay.groups, "sdpa", torch.float32)[:, 0]
    g = lay.groups
    for r in range(2):
        cross = (g[r][:, None] > 0) & (g[r][None, :] > 0) & (g[r][:, None] != g[r][None, :])
        assert not mask[r][cross].any()
        assert not mask[r][(g[r][:, None] < 0) & (g[r][None, :] >= 0)].any()
        assert mask[r].any(dim=-1).all()  # no empty softmax row


def test_switch_off_changes_only_the_evaluate_hash() -> None:
    import hashlib
    import json

    from medreason.config import build_config

    base = build_config(env={})
    off = build_config(overrides=["eval.loglik_shared_context=false"], env={})
    assert base.eval.loglik_shared_context is True
    assert off.stage_hash("evaluate") != base.stage_hash("evaluate")
    assert off.stage_hash("train") == base.stage_hash("train")
    # On (the default) hashes as if the field did not exist, as evaluations committed before it.
    data = {s: base.model_dump(mode="json")[s] for s in ("model", "data", "lora", "train", "eval")}
    for key in ("tracker_project", "tracker_run_name"):
        data["train"].pop(key)
    data["train"]["report_to"] = []
    for key in ("loglik_shared_context", "fused_activation", "decode_attention"):  # at their defaults
        del data["eval"][key]
    for key in ("attention_in_graph", "lora_fused"):  # at their defaults
        del data["train"][key]
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    assert base.stage_hash("evaluate") == hashlib.sha256(blob).hexdigest()
