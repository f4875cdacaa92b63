"""The decode attention kernel (medreason/evaluation/decode_attention.py) on CPU, through Triton's
interpreter (TRITON_INTERPRET=1): the same kernel source a GPU compiles, run with numpy.

Against PyTorch's SDPA with the equivalent mask (float32: agreement to float rounding; the kernel
sums in another order), and through the decode loop against the sdpa path.

Triton decides at import whether its own library functions are interpreted, so the kernel tests
run in a fresh pytest process started with TRITON_INTERPRET=1 (the first test below); in this
process they skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from medreason.evaluation import decode_attention as da  # noqa: E402
from medreason.evaluation.decoding import greedy_static, kernel_rows  # noqa: E402

PROMPTS = ["A 45-year-old man presents with crushing chest pain radiating to the left arm",
           "Fever", "A child with a barking cough and stridor at night", "Jaundice and dark urine"]


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 process")
KERNEL_TESTS = 11  # the tests marked ``interpreter`` (parametrized cases counted)


def _interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a loop bound loaded from memory into an int with
    ``int(one_element_array)``, which numpy >= 2.4 refuses for arrays of one dimension; give
    its tensors an ``__index__`` that takes the element instead (test process only)."""
    from triton.runtime import interpreter as interp

    patch = interp._patch_lang_tensor

    def patched(tensor, scope):  # noqa: ANN001, ANN202
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


if INTERPRETED:
    _interpreter_loop_bounds()


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreted process")
def test_kernel_tests_pass_under_the_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "kernel",
                           __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{KERNEL_TESTS} passed" in proc.stdout, proc.stdout[-2000:]


def _reference(q, k, v, starts, end: int, scale: float):  # noqa: ANN001, ANN202
    import torch
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    index = torch.arange(k.shape[2])
    mask = (index[None, :] >= starts[:, None].long()) & (index[None, :] < end)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale).transpose(1, 2)


@interpreter
@pytest.mark.parametrize(("heads", "kv_heads", "block", "splits", "dim"),
                         [(4, 4, 16, 1, 16), (4, 2, 8, 4, 16), (2, 1, 64, 8, 16),  # 8 splits of 1 block: some empty
                          (2, 2, 8, 1, 20), (2, 1, 16, 2, 14)])  # 20 = 16 + 4 (two loads), 14: masked to 16
def test_kernel_matches_sdpa_with_the_equivalent_mask(heads: int, kv_heads: int, block: int, splits: int,
                                                      dim: int) -> None:
    import torch

    torch.manual_seed(0)
    rows, length, end = 3, 40, 33
    params = da.LaunchParams(block=block, warps=1, splits=splits)
    # The query as transformers hands it: a transposed view, not contiguous.
    q = torch.randn(rows, 1, heads, dim).transpose(1, 2)
    k, v = torch.randn(rows, kv_heads, length, dim), torch.randn(rows, kv_heads, length, dim)
    starts = torch.tensor([0, 7, 32], dtype=torch.int32)  # the last row: a single position in range
    got = da.decode_attention(q, k, v, starts, torch.tensor([end], dtype=torch.int32), 0.3, params)
    assert got.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(got, _reference(q, k, v, starts, end, 0.3), atol=1e-5, rtol=1e-5)
    # Positions outside [start, end) are never read: garbage there changes nothing.
    k2, v2 = k.clone(), v.clone()
    k2[:, :, end:] = float("nan")
    v2[0, :, end:] = 1e30
    v2[1, :, :7] = float("nan")
    again = da.decode_attention(q, k2, v2, starts, torch.tensor([end], dtype=torch.int32), 0.3, params)
    assert torch.equal(again, got)


@interpreter
def test_kernel_rejects_what_it_cannot_compute() -> None:
    import torch

    one = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="one query per row"):
        da.decode_attention(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), one, one, 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        da.decode_attention(torch.zeros(1, 3, 1, 8), torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), one, one, 1.0)


def test_launch_params_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from medreason.errors import InputError

    monkeypatch.delenv(da.KERNEL_ENV, raising=False)
    assert da.launch_params() == da.LaunchParams()
    monkeypatch.setenv(da.KERNEL_ENV, "block=32, warps=4,splits=8")
    assert da.launch_params() == da.LaunchParams(block=32, warps=4, splits=8)
    monkeypatch.setenv(da.KERNEL_ENV, "block=16,stages=3")
    assert da.launch_params() == da.LaunchParams(block=16, stages=3)
    for bad in ("block=48", "blocks=32", "splits=two", "8", "stages=0"):
        monkeypatch.setenv(da.KERNEL_ENV, bad)
        with pytest.raises(InputError, match=da.KERNEL_ENV):
            da.launch_params()


def test_head_split_loads_no_masked_lane_where_it_can() -> None:
    assert da.head_split(80) == (64, 16)  # Phi-2
    assert da.head_split(128) == (128, 0)
    assert da.head_split(96) == (64, 32)
    assert da.head_split(112) == (128, 0)  # 64 + 48: no split, 16 lanes masked


def test_row_starts_accepts_plain_left_padding_only() -> None:
    import torch

    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert da.row_starts(mask).tolist() == [2, 0, 3]
    assert da.row_starts(torch.tensor([[1, 0, 1, 1]])) is None  # a hole: not one range


def test_rows_fall_back_to_sdpa_off_a_gpu(monkeypatch, caplog) -> None:
    import torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with caplog.at_level("INFO", logger="medreason.evaluation.decoding"):
        assert kernel_rows("triton", torch.device("cpu"), mask) is None
    assert "decode attention: sdpa (no Triton kernel on cpu)" in caplog.text
    assert kernel_rows("sdpa", torch.device("cpu"), mask) is None
    with pytest.raises(ValueError, match="'triton' or 'sdpa'"):
        kernel_rows("flash", torch.device("cpu"), mask)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_rows("triton", torch.device("cpu"), mask).tolist() == [1, 0]
    with caplog.at_level("INFO", logger="medreason.evaluation.decoding"):
        assert kernel_rows("triton", torch.device("cpu"), torch.tensor([[1, 0, 1]])) is None
    assert "not plain left padding" in caplog.text


@pytest.fixture(scope="module")
def tiny(tiny_phi_dir: Path):
    from helpers import tiny_phi_batch

    return tiny_phi_batch(tiny_phi_dir, PROMPTS)


@interpreter
def test_decode_loop_with_the_kernel_gives_the_sdpa_path_tokens(tiny) -> None:
    import torch

    model, tok, ids, mask = tiny
    new, cache_len = 12, ids.shape[1] + 16
    before = model.config._attn_implementation
    plain = greedy_static(model, ids, mask, new, cache_len, tok.pad_token_id, [], bucket_tokens=4, attention="sdpa")
    kernel = greedy_static(model, ids, mask, new, cache_len, tok.pad_token_id, [], bucket_tokens=4,
                           attention="triton")
    assert torch.equal(kernel, plain)
    assert model.config._attn_implementation == before  # the prefill and later calls: the model's own
    # Rows finishing early (an EOS row 1 emits at its 3rd token): pads after it, the others run on.
    eos = [int(plain[1, 2])]
    got = greedy_static(model, ids, mask, new, cache_len, tok.pad_token_id, eos, bucket_tokens=4, attention="triton")
    ref = greedy_static(model, ids, mask, new, cache_len, tok.pad_token_id, eos, bucket_tokens=4, attention="sdpa")
    assert torch.equal(got, ref)
    assert bool((got[1, 3:] == tok.pad_token_id).all())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not INTERPRETED and not _cuda(), reason="runs in the TRITON_INTERPRET=1 process, or on a GPU")
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_kernel_rotary_cache_write_is_bit_identical_to_transformers(dtype_name: str) -> None:
    import torch
    from transformers.models.phi.modeling_phi import apply_rotary_pos_emb

    from medreason.evaluation.decode_rotary import rotary_cache_write

    torch.manual_seed(0)
    dtype, device = getattr(torch, dtype_name), "cpu" if INTERPRETED else "cuda"
    rows, heads, dim, rot, length = 3, 4, 20, 6, 9  # Phi-2's shape in small: rotary 40% of the head
    q, k, v = (torch.randn(rows, 1, heads * dim).to(device, dtype) for _ in range(3))
    angles = torch.cat([torch.randn(rows, 1, rot // 2) * 3] * 2, -1).to(device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    cache_k, cache_v = (torch.randn(rows, heads, length, dim).to(device, dtype) for _ in range(2))
    before_k, before_v = cache_k.clone(), cache_v.clone()
    end = torch.tensor([6], dtype=torch.int32, device=device)
    got = rotary_cache_write(q, k, v, cos, sin, cache_k, cache_v, end, heads, heads, dim, rot)

    def split(t):  # noqa: ANN001, ANN202 - as PhiAttention.forward shapes a projection
        return t.view(rows, 1, heads, dim).transpose(1, 2)

    q_rot, k_rot = apply_rotary_pos_emb(split(q)[..., :rot], split(k)[..., :rot], cos, sin)
    want_q = torch.cat([q_rot, split(q)[..., rot:]], -1)
    want_k = torch.cat([k_rot, split(k)[..., rot:]], -1)
    assert got.shape == (rows, heads, 1, dim) and got.dtype == dtype
    assert torch.equal(cache_v[:, :, 5:6], split(v))
    if INTERPRETED and dtype == torch.bfloat16:
        # The interpreter casts float32 to bfloat16 by truncation (a GPU rounds to nearest even,
        # as PyTorch does), three times per element: a few bf16 units of the inputs' size (~4)
        # apart. float32 above shows the arithmetic exact; the GPU run shows bf16 bit-identical.
        ulp = dict(atol=0.05, rtol=0.02)
        torch.testing.assert_close(got, want_q, **ulp)
        torch.testing.assert_close(cache_k[:, :, 5:6], want_k, **ulp)
    else:
        assert torch.equal(got, want_q)
        assert torch.equal(cache_k[:, :, 5:6], want_k)
    others = [i for i in range(length) if i != 5]  # nothing else written
    assert torch.equal(cache_k[:, :, others], before_k[:, :, others])
    assert torch.equal(cache_v[:, :, others], before_v[:, :, others])


@interpreter
def test_decode_loop_with_the_fused_rotary_kernel_gives_the_unfused_tokens(tiny, monkeypatch) -> None:
    import torch

    from medreason.evaluation import decode_rotary

    model, tok, ids, mask = tiny
    new, cache_len = 10, ids.shape[1] + 12
    calls = []
    real = decode_rotary.rotary_cache_write
    monkeypatch.setattr(decode_rotary, "rotary_cache_write", lambda *a: calls.append(1) or real(*a))
    fused = greedy_static(model, ids, mask, new, cache_len, tok.pad_token_id, [], attention="triton")
    assert len(calls) == (new - 1) * model.config.num_hidden_layers  # every decode step, every layer
    monkeypatch.setenv(decode_rotary.FUSED_ENV, "0")
    unfused = greedy_static(model, ids, mask, new, cache_len, tok.pad_token_id, [], attention="triton")
    assert len(calls) == (new - 1) * model.config.num_hidden_layers  # switched off: not called again
    assert torch.equal(fused, unfused)
    assert not any("forward" in vars(m) for m in model.modules())  # the modules' own forward restored


@interpreter
def test_kernel_warm_up_launches_each_decode_kernel_once(monkeypatch) -> None:
    from medreason.evaluation import decode_attention, decode_rotary, warmup

    seen = []
    for module, name in ((decode_attention, "decode_attention"), (decode_rotary, "rotary_cache_write")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: seen.append(name) or real(*a))
    shapes = warmup.kernel_shapes({"num_attention_heads": 4, "hidden_size": 64, "partial_rotary_factor": 0.4})
    assert shapes == {"heads": 4, "kv_heads": 4, "head_dim": 16, "rotary": 6}
    warmup.warm(shapes, "float32", "cpu")
    assert seen == ["rotary_cache_write", "decode_attention"]


def test_warm_up_shapes_from_configs_and_where_it_does_not_start(tmp_path: Path) -> None:
    from medreason.config import build_config
    from medreason.evaluation import warmup
    from medreason.evaluation.stage import Dist, _warm_decode_kernels

    phi2 = {"num_attention_heads": 32, "num_key_value_heads": 32, "hidden_size": 2560,
            "rope_parameters": {"partial_rotary_factor": 0.4, "rope_theta": 10000.0}}
    assert warmup.kernel_shapes(phi2) == {"heads": 32, "kv_heads": 32, "head_dim": 80, "rotary": 32}
    llama = {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64}
    assert warmup.kernel_shapes(llama) == {"heads": 9, "kv_heads": 3, "head_dim": 64, "rotary": 64}
    assert warmup.start(str(tmp_path), "torch.bfloat16") is None  # no config.json: nothing to warm
    import torch

    cfg = build_config(preset="demo", env={})
    assert _warm_decode_kernels(None, cfg, Dist(device=torch.device("cpu"))) is None  # no GPU: no helper


def test_decode_attention_is_a_config_field_hashed_as_absent_at_its_default() -> None:
    from pydantic import ValidationError

    from medreason.config import build_config

    default = build_config(preset="demo")
    assert default.eval.decode_attention == "triton"
    plain = build_config(preset="demo", overrides=["eval.decode_attention=sdpa"])
    assert plain.eval.decode_attention == "sdpa"
    # A config recorded before the field existed hashes like today's default (the same tokens
    # up to float rounding), so stages evaluated before keep their hashes; sdpa is a change.
    import hashlib
    import json

    from medreason.config import hashed_sections

    recorded = default.model_dump(mode="json")
    del recorded["eval"]["decode_attention"]
    blob = json.dumps(hashed_sections(recorded, ("eval",)), sort_keys=True, separators=(",", ":")).encode()
    assert hashlib.sha256(blob).hexdigest() == default.section_hash("eval")
    assert default.section_hash("eval") != plain.section_hash("eval")
    with pytest.raises((ValidationError, ValueError)):
        build_config(preset="demo", overrides=["eval.decode_attention=flash"])
