"""The static-cache decode loop (medreason/evaluation/decoding.py) against transformers' generate().

On CPU the loop runs without CUDA graphs (the graphs replay the same eager step on a GPU); the
prefix views of the cache, the masks, the EOS handling and the bucket changes are all exercised.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from medreason.evaluation.decoding import PrefixCacheView, bucket_length, greedy_static, plain_greedy_only
from medreason.evaluation.generation import _generate_batch, _Progress, decode_path

PROMPTS = ["A 45-year-old man presents with crushing chest pain radiating to the left arm",
           "Fever", "A child with a barking cough and stridor at night", "Jaundice and dark urine"]


@pytest.fixture(scope="module")
def tiny(tiny_phi_dir: Path):
    import torch
    from helpers import tiny_phi_batch

    torch.manual_seed(0)
    return tiny_phi_batch(tiny_phi_dir, PROMPTS)


def _reference(model, tok, ids, mask, new: int, eos: list[int], cache_len: int, monkeypatch):  # noqa: ANN001, ANN202
    """generate() with its own static cache of ``cache_len`` positions."""
    monkeypatch.setattr(model, "_previous_max_cache_length", cache_len, raising=False)
    progress = _Progress("ref", ids.shape[1], eos, 1e9, 0.0)
    return _generate_batch(model, ids, mask, new, tok.pad_token_id, eos, progress,
                           {"cache_implementation": "static", "disable_compile": True})


@pytest.mark.parametrize("bucket", [4, 64])
def test_tokens_match_generate_with_rows_finishing_at_different_steps(tiny, monkeypatch, bucket: int) -> None:
    import torch

    model, tok, ids, mask = tiny
    new, cache_len = 12, ids.shape[1] + 16
    free = greedy_static(model, ids, mask, new, cache_len, tok.pad_token_id, [], bucket_tokens=bucket)
    assert free.shape == (len(PROMPTS), new)
    assert torch.equal(free, _reference(model, tok, ids, mask, new, [], cache_len, monkeypatch))
    # An "EOS" the model does emit: row 0 stops at its 4th token; rows that never emit it run on.
    eos = [int(free[0, 3])]
    got = greedy_static(model, ids, mask, new, cache_len, tok.pad_token_id, eos, bucket_tokens=bucket)
    ref = _reference(model, tok, ids, mask, new, eos, cache_len, monkeypatch)
    assert torch.equal(got[:, : ref.shape[1]], ref)
    assert bool((got[:, ref.shape[1]:] == tok.pad_token_id).all())  # checked every few steps: only pads after
    assert bool((got[0, 4:] == tok.pad_token_id).all()) and int(got[0, 3]) == eos[0]
    assert not torch.equal(got, free)  # the case under test: a row really finished early


def test_every_row_finished_stops_the_loop(tiny) -> None:
    model, tok, ids, mask = tiny
    first = greedy_static(model, ids, mask, 1, ids.shape[1] + 1, tok.pad_token_id, [])
    eos = sorted({int(t) for t in first[:, 0]})  # every row's first token ends it
    got = greedy_static(model, ids, mask, 64, ids.shape[1] + 64, tok.pad_token_id, eos, bucket_tokens=8)
    assert got.shape[1] < 64 and bool((got[:, 1:] == tok.pad_token_id).all())


def test_prefix_view_reads_only_its_length(tiny) -> None:
    import torch
    from transformers import StaticCache

    model, _tok, _ids, _mask = tiny
    cache = StaticCache(config=model.config, max_cache_len=32)
    view = PrefixCacheView(cache, 32)
    k = torch.randn(2, model.config.num_attention_heads, 5, 4)
    keys, values = cache.layers[0].update(k, k.clone())
    assert keys.shape[2] == 32
    view.length = 8
    keys, values = cache.layers[0].update(k, k.clone())  # written at positions 5..9, read up to 8
    assert keys.shape[2] == values.shape[2] == 8
    assert torch.equal(keys[:, :, 5:8], k[:, :, :3]) and torch.equal(cache.layers[0].keys[:, :, 5:10], k)


def test_bucket_length() -> None:
    assert [bucket_length(p, 128, 1024) for p in (0, 127, 128, 1000, 1023)] == [128, 128, 256, 1024, 1024]
    assert bucket_length(600, 128, 700) == 640 and bucket_length(650, 128, 700) == 700


def test_logits_processors_fall_back_to_generate(tiny) -> None:
    model, _tok, _ids, _mask = tiny
    assert decode_path("graphs", True, model) == "graphs"
    assert decode_path("graphs", False, model) == "generate"  # a dynamic cache: generate()
    assert decode_path("none", True, model) == "generate"
    saved = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.3
    try:
        assert plain_greedy_only(model) == "repetition_penalty"
        assert decode_path("graphs", True, model) == "generate"
    finally:
        model.generation_config.repetition_penalty = saved


def test_cache_too_short_is_refused(tiny) -> None:
    model, tok, ids, mask = tiny
    with pytest.raises(ValueError, match="cache of"):
        greedy_static(model, ids, mask, 8, ids.shape[1] + 4, tok.pad_token_id, [])


def test_closed_view_frees_the_cache_without_the_garbage_collector(tiny) -> None:
    """The wrapped update holds the layer's bound method (a cycle): unless closed, a batch's
    cache would stay allocated until a gc run, beside the next batch's."""
    import gc
    import weakref

    import torch
    from transformers import StaticCache

    model, _tok, _ids, _mask = tiny
    k = torch.randn(1, model.config.num_attention_heads, 2, 4)
    gc.disable()
    try:
        refs = []
        for close in (False, True):
            cache = StaticCache(config=model.config, max_cache_len=8)
            view = PrefixCacheView(cache, 8)
            cache.layers[0].update(k, k.clone())
            refs.append(weakref.ref(cache.layers[0]))
            if close:
                view.close()
            del cache, view
        assert refs[0]() is not None and refs[1]() is None
    finally:
        gc.enable()


def test_attention_kernel_choice(tiny, monkeypatch) -> None:
    """MEDREASON_DECODE_SDPA picks the decode step's attention kernels; the math kernel gives the
    default path's tokens on CPU, and a wrong name stops with the list of names."""
    import torch

    model, tok, ids, mask = tiny
    want = greedy_static(model, ids, mask, 6, ids.shape[1] + 8, tok.pad_token_id, [])
    monkeypatch.setenv("MEDREASON_DECODE_SDPA", "math")
    assert torch.equal(greedy_static(model, ids, mask, 6, ids.shape[1] + 8, tok.pad_token_id, []), want)
    monkeypatch.setenv("MEDREASON_DECODE_SDPA", "cudnn,bogus")
    with pytest.raises(ValueError, match="unknown \\['bogus'\\]"):
        greedy_static(model, ids, mask, 6, ids.shape[1] + 8, tok.pad_token_id, [])


def test_bad_kernel_name_stops_before_the_first_batch(tiny, monkeypatch) -> None:
    """A mistyped MEDREASON_DECODE_SDPA is the user's input (exit 2), found when the decoder is
    chosen, before any batch runs."""
    from medreason.errors import InputError

    model, _tok, _ids, _mask = tiny
    monkeypatch.setenv("MEDREASON_DECODE_SDPA", "cuddn")
    with pytest.raises(InputError, match="MEDREASON_DECODE_SDPA='cuddn': unknown"):
        decode_path("graphs", True, model)
    assert decode_path("none", True, model) == "generate"  # generate() does not read it
    monkeypatch.delenv("MEDREASON_DECODE_SDPA")
    for name in ("MEDREASON_DECODE_FUSED", "MEDREASON_PREFILL_CHUNKS"):  # the switches back, mistyped
        monkeypatch.setenv(name, "of")
        with pytest.raises(InputError, match=f"{name}='of': expected 1/true/yes/on or 0/false/no/off"):
            decode_path("graphs", True, model)
        monkeypatch.setenv(name, "off")
        assert decode_path("graphs", True, model) == "graphs"
