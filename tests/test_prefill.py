"""The prefill in groups of rows (medreason/evaluation/prefill.py) against the whole-batch prefill
and transformers' generate(), on the tiny random Phi in float32."""

from __future__ import annotations

from pathlib import Path

import pytest

from medreason.evaluation import prefill as pf
from medreason.evaluation.decoding import greedy_static
from medreason.evaluation.generation import _generate_batch, _Progress

# Longest first, as the planner sorts a batch; lengths far apart so that groups pay off.
PROMPTS = ["A 45-year-old man presents with crushing chest pain radiating to the left arm and sweating",
           "A child with a barking cough and stridor at night", "Jaundice and dark urine", "Fever"]


@pytest.fixture(scope="module")
def tiny(tiny_phi_dir: Path):
    from helpers import tiny_phi_batch

    model, tok, ids, mask = tiny_phi_batch(tiny_phi_dir, PROMPTS)
    assert mask.sum(-1).tolist() == sorted(mask.sum(-1).tolist(), reverse=True)
    return model, tok, ids, mask


def _cost(lengths: list[int], groups: list[tuple[int, int, int]], overhead: int) -> int:
    return sum((end - first) * width + overhead for first, end, width in groups)


def test_plan_chunks_covers_the_rows_at_least_cost() -> None:
    lengths = [2040, 2028, 1389, 1345, 1254] + [1041] * 3 + [900] * 60 + [700] * 60
    groups = pf.plan_chunks(lengths, 2048)
    assert [g[0] for g in groups] == [0] + [g[1] for g in groups[:-1]] and groups[-1][1] == len(lengths)
    assert all(width == max(lengths[first:end]) for first, end, width in groups)
    assert groups[0] == (0, 2, 2040)  # the two longest alone: the rest would pad to 2,040
    whole = len(lengths) * 2040 + 2048
    assert _cost(lengths, groups, 2048) < 0.5 * whole
    # Brute force over every split of a short list: nothing cheaper exists.
    short = [9, 8, 8, 3, 2, 2]
    for overhead in (0, 4, 100):
        best = min(_cost(short, _groups(short, cuts), overhead) for cuts in _all_cuts(len(short)))
        assert _cost(short, pf.plan_chunks(short, overhead), overhead) == best
    assert pf.plan_chunks(short, 100) == [(0, 6, 9)]  # a forward costs more than the padding saved
    assert pf.plan_chunks([], 10) == []


def _all_cuts(n: int) -> list[list[int]]:
    return [[i for i in range(1, n) if mask >> (i - 1) & 1] for mask in range(2 ** (n - 1))]


def _groups(lengths: list[int], cuts: list[int]) -> list[tuple[int, int, int]]:
    bounds = [0, *cuts, len(lengths)]
    return [(a, b, max(lengths[a:b])) for a, b in zip(bounds, bounds[1:], strict=False)]


def _prefill(model, ids, mask, monkeypatch, chunks: bool):  # noqa: ANN001, ANN202
    import torch
    from transformers import StaticCache

    monkeypatch.setenv(pf.CHUNKS_ENV, "1" if chunks else "0")
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.inference_mode():
        return pf.prefill(model, ids, mask, positions, cache), cache


def test_grouped_prefill_writes_what_the_whole_batch_prefill_writes(tiny, monkeypatch) -> None:
    import torch

    model, _, ids, mask = tiny
    monkeypatch.setattr(pf, "CHUNK_OVERHEAD_TOKENS", 0)
    planned = []
    real_plan = pf.plan_chunks
    monkeypatch.setattr(pf, "plan_chunks", lambda *a: planned.append(real_plan(*a)) or planned[-1])
    got, grouped = _prefill(model, ids, mask, monkeypatch, chunks=True)
    assert len(planned[0]) > 1 and planned[0][-1][2] < ids.shape[1]  # really in groups, narrower windows
    want, whole = _prefill(model, ids, mask, monkeypatch, chunks=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    width = ids.shape[1]
    for row, length in enumerate(mask.sum(-1).tolist()):
        for a, b in zip(grouped.layers, whole.layers, strict=True):
            real = slice(width - length, width)  # a row's real positions; its padding is never read
            torch.testing.assert_close(a.keys[row, :, real], b.keys[row, :, real], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.values[row, :, real], b.values[row, :, real], atol=1e-5, rtol=1e-5)
            assert not bool(a.keys[row, :, width:].any())  # nothing beyond the prompts yet
    # The batch cache's own write position, as after a whole-batch prefill.
    assert [int(la.cumulative_length) for la in grouped.layers] == [width] * len(grouped.layers)


def test_decode_after_a_grouped_prefill_gives_the_generate_tokens(tiny, monkeypatch) -> None:
    import torch

    model, tok, ids, mask = tiny
    monkeypatch.setattr(pf, "CHUNK_OVERHEAD_TOKENS", 0)
    new, cache_len = 10, ids.shape[1] + 12
    got = greedy_static(model, ids, mask, new, cache_len, tok.pad_token_id, [], bucket_tokens=4)
    monkeypatch.setattr(model, "_previous_max_cache_length", cache_len, raising=False)
    ref = _generate_batch(model, ids, mask, new, tok.pad_token_id, [], _Progress("ref", ids.shape[1], [], 1e9, 0.0),
                          {"cache_implementation": "static", "disable_compile": True})
    assert torch.equal(got, ref)
